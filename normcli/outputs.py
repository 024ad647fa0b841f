"""Where output files go (`--out`), for every command that writes files.

- No `--out`: the default paths. An existing folder, a path ending in `/`, or an `--out` for
  several files is a folder: the default names go inside it, and a missing folder is created
  (with its parents) only when the outputs are claimed, after every check has passed.
- Otherwise `--out` names one file. For a figure its extension picks the format: png, svg or
  pdf in any case (`x.PNG` is written as PNG under that name); any other extension, or none,
  is refused before any work. A checkpoint (`checkpoint_path`) may take any name.
- An existing file is refused unless `overwrite`; anything but a regular file always is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from normcli.errors import NormcliError
from normcli.files import (
    check_folder_writable,
    check_replaceable,
    check_writable,
    exclusive_output,
)

FORMATS = ("png", "svg", "pdf")


def image_format(path: Path) -> str | None:
    """The image format a path's extension names (png, svg, pdf, any case), else None."""
    suffix = path.suffix.lstrip(".").lower()
    return suffix if suffix in FORMATS else None


@dataclass
class OutputPlan:
    """Checked output paths; `claim()` makes the folder and holds the paths while writing."""

    paths: list[Path]
    overwrite: bool
    missing: list[Path] = field(default_factory=list)  # folders to create, outermost first

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    @contextlib.contextmanager
    def claim(self) -> Iterator[list[Path]]:
        """Create the missing folder, then hold every path against other normcli processes."""
        created = []
        try:
            for folder in self.missing:
                folder.mkdir(exist_ok=True)
                created.append(folder)
            with contextlib.ExitStack() as stack:
                for path in self.paths:
                    stack.enter_context(exclusive_output(path))
                    # Checked again under the claim: another process may have written it since.
                    _check_target(path, self.overwrite)
                yield self.paths
        except BaseException:
            for folder in reversed(created):  # leave no empty folder behind a failure
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise


def plan_outputs(
    out: str | os.PathLike[str] | None,
    defaults: Sequence[Path],
    overwrite: bool,
    *,
    option: str = "--out",
) -> OutputPlan:
    """Output paths: the defaults, or inside `out` when it is a folder, or `out` for one file.

    Checked before any work, as the module docstring says; `option` names the CLI option in
    the messages. Nothing is created here: see `OutputPlan.claim`.
    """
    missing: list[Path] = []
    if out is None:
        paths = list(defaults)
    else:
        folder = Path(out)
        if _names_folder(out) or len(defaults) > 1:
            missing = _missing_folders(folder, option, len(defaults))
            paths = [folder / d.name for d in defaults]
        else:
            if image_format(folder) is None:
                raise NormcliError(_format_problem(option, os.fspath(out), folder))
            paths = [folder]
    for path in paths:
        if paths.count(path) > 1:
            raise NormcliError(f"two outputs would both be {path}; write them one at a time")
    for path in paths:
        if not missing:  # inside a folder still to be made there is nothing to check
            _check_target(path, overwrite)
            check_writable(path)
    return OutputPlan(paths, overwrite, missing)


def _names_folder(out: str | os.PathLike[str]) -> bool:
    """Whether `--out` names a folder: one that exists, or a path ending in '/'."""
    return os.fspath(out).endswith(("/", os.sep)) or Path(out).is_dir()


def checkpoint_path(
    default: Path,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resuming: bool = False,
) -> Path:
    """Where `train` writes a checkpoint whose default path is `default`, checked before any
    work: `out`, or the default name inside folder `out`, or `default`. An existing folder
    must be writable (a missing one is made after the data loads), and a file there is
    replaced only with `overwrite` (or continued, when `resuming`)."""
    if out is None:
        path = default
    elif _names_folder(out):
        path = Path(out) / default.name
    else:
        path = Path(out)
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == Path())
    if existing.exists() and not existing.is_dir():
        raise NormcliError(f"{path}: {existing} is not a folder")
    if path.parent.is_dir():
        check_writable(path)
    if not resuming and path.exists() and not overwrite:
        raise NormcliError(f"{path} exists; pass --overwrite to replace it, or --out elsewhere")
    return path


def _check_target(path: Path, overwrite: bool) -> None:
    check_replaceable(path)
    if path.exists() and not overwrite:
        raise NormcliError(f"{path} exists; pass --overwrite to replace it")


def _format_problem(option: str, text: str, path: Path) -> str:
    formats = ", ".join(FORMATS[:-1]) + f" or {FORMATS[-1]}"
    if not path.suffix:
        return (
            f"{option} {text}: no image extension; name a .png, .svg or .pdf file, "
            f"or end it with / for a folder"
        )
    return f"{option} {text}: unknown image format {path.suffix!r}; use {formats}"


def _missing_folders(folder: Path, option: str, count: int) -> list[Path]:
    """The folders to create for `folder` (outermost first), after checking they can be."""
    missing = []
    current = folder
    while not current.exists() and not current.is_symlink():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    if not current.is_dir():
        what = f"writing {count} files needs a folder" if count > 1 else "not a folder"
        raise NormcliError(f"{option} {folder}: {what}, and {current} is a file")
    check_folder_writable(current, folder)
    return missing[::-1]
