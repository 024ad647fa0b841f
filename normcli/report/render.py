"""The report as text (jinja2 templates in normcli/templates) and as files.

The HTML page is self-contained: figures are SVG data URIs and the style sheet is inline;
its Content-Security-Policy forbids every request, so a page that tried one would say so in
the browser's console instead of quietly fetching it. The Markdown twin shows the same
tables and points at the same figures written as SVG files in a folder beside it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import jinja2

from normcli.errors import NormcliError
from normcli.files import atomic_write, check_folder_writable, check_replaceable, exclusive_output
from normcli.report.build import Report

# Nothing may be fetched: only inline styles and images from data: URIs.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
HTML_SUFFIXES = (".html", ".htm")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("normcli", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = markdown_cell
    env.filters["exact"] = repr  # data-* numbers: every digit, as Python and JSON read them
    return env


def markdown_cell(text: object) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def render_html(report: Report) -> str:
    """The self-contained HTML page."""
    template = _environment().get_template("report.html")
    return template.render(report=report, csp=CONTENT_SECURITY_POLICY)


def render_markdown(report: Report, folder: str, page: str = "the HTML page") -> str:
    """The Markdown twin; its images are `folder`/<name>.svg (a folder beside it), and
    `page` names the HTML page it is the twin of."""
    template = _environment().get_template("report.md")
    return template.render(report=report, folder=folder, page=page)


def figures_folder(html: Path) -> Path:
    """Where the Markdown twin's figures go: <stem>_figures beside the page."""
    return html.with_name(f"{html.stem}_figures")


def _check_target(path: Path, overwrite: bool) -> None:
    check_replaceable(path)
    if path.exists() and not overwrite:
        raise NormcliError(f"{path} exists; pass --overwrite to replace it")


def _nearest_folder(path: Path) -> Path:
    """The deepest existing folder above `path` (refused if a file stands in the way)."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NormcliError(f"{path}: {parent} is not a folder")
            return parent
    return Path(".")


def check_outputs(out: Path, markdown: bool, overwrite: bool) -> list[Path]:
    """The files `write_report` will write, checked before any work (see its docstring)."""
    if out.suffix.lower() not in HTML_SUFFIXES:
        raise NormcliError(f"--out {out}: name an .html file")
    paths = [out]
    if markdown:
        folder = figures_folder(out)
        paths.append(out.with_suffix(".md"))
        if folder.exists() and not folder.is_dir():
            raise NormcliError(f"{folder}: exists and is not a folder (the Markdown's figures)")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise NormcliError(f"{folder} exists; pass --overwrite to replace its figures")
    for path in paths:
        _check_target(path, overwrite)
    check_folder_writable(_nearest_folder(out), out)
    return paths


def write_report(
    report: Report, out: str | os.PathLike[str], *, markdown: bool = False,
    overwrite: bool = False,
) -> list[Path]:  # fmt: skip
    """Write the page to `out` (.html) and, with `markdown`, its twin <stem>.md with the
    figures in <stem>_figures/ beside it; returns the files written (page first).

    Everything is rendered before anything is written, and each file is written atomically;
    an existing file is replaced only with `overwrite` (then stale figures in the folder go).
    A missing folder for `out` is created."""
    out = Path(out)
    paths = check_outputs(out, markdown, overwrite)
    html = render_html(report)
    folder = figures_folder(out)
    text = render_markdown(report, folder.name, out.name) if markdown else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as claims:
        for path in paths:
            claims.enter_context(exclusive_output(path))
        if text is not None:
            _write_figures(report, folder)
            atomic_write(paths[1], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        atomic_write(out, lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
    return paths


def _write_figures(report: Report, folder: Path) -> None:
    """Each figure as folder/<name>.svg; SVG files of an earlier report that this one has
    not are removed."""
    folder.mkdir(exist_ok=True)
    names = set()
    for figure in report.all_figures():
        path = folder / f"{figure.name}.svg"
        names.add(path.name)
        atomic_write(path, lambda tmp, f=figure: Path(tmp).write_text(f.svg, encoding="utf-8"))
    for stale in folder.glob("*.svg"):
        if stale.name not in names:
            stale.unlink()
