"""`normcli report`: the page's numbers against `eval --group-by --json` and a computation by
hand, its Markdown twin, its self-containedness, and the page in a real browser (chromium)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from conftest import run_cli, train_tiny

from normcli.checkpoint import CheckpointMeta, load_checkpoint, read_file, read_metadata
from normcli.machine import cpu_model
from normcli.report.groups import grouping_keys, pooled_settings
from normcli.report.provenance import sweep_command, train_command, wall_seconds, wall_time_text
from normcli.report.render import CONTENT_SECURITY_POLICY
from normcli.stats import t_quantile

RUNS = {"bn_l1": ("--norm", "bn", "--l1", "1e-4"), "gn": ("--norm", "gn", "--groups", "2"),
        "ln": ("--norm", "ln")}  # fmt: skip
SEEDS = (1, 2, 3)


@dataclass
class Study:
    folder: Path
    out: Path
    html: str
    markdown: str
    stdout: str


@pytest.fixture(scope="module")
def study(tiny_data: Path, tiny_checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    """Three norms x three seeds of the tiny runs, and their report with its Markdown twin."""
    folder = tmp_path_factory.mktemp("study")
    for name, options in RUNS.items():
        shutil.copy(tiny_checkpoints[name], folder / f"{name}_s1.safetensors")  # seed 1
        for seed in SEEDS[1:]:
            path = folder / f"{name}_s{seed}.safetensors"
            train_tiny(tiny_data, path, *options, "--seed", str(seed))
    out = tmp_path_factory.mktemp("report") / "study.html"
    result = run_cli("report", folder, "--out", out, "--markdown", "--data-dir", tiny_data,
                     "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return Study(folder, out, out.read_text(), out.with_suffix(".md").read_text(), result.stdout)


class Page(HTMLParser):
    """The parts of a report page the tests read: tables by section, images, attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.section: str | None = None
        self.tables: dict[str | None, list[dict]] = {}
        self.tags: list[tuple[str, dict]] = []
        self._row: dict | None = None
        self._cell: dict | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "h2":
            self.section = a.get("id")
        elif tag == "table":
            self.tables.setdefault(self.section, []).append({"head": [], "rows": []})
        elif tag == "tr":
            self._row = {"attrs": a, "cells": []}
        elif tag in ("td", "th"):
            self._cell = {"attrs": a, "text": "", "head": tag == "th"}

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            table = self.tables[self.section][-1]
            if all(c["head"] for c in self._row["cells"]):
                table["head"] = [c["text"] for c in self._row["cells"]]
            else:
                table["rows"].append(self._row)
            self._row = None

    def all_tables(self) -> list[dict]:
        return [t for tables in self.tables.values() for t in tables]


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table of a Markdown text: rows of cell texts, the header row first."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|( -+:? \|)+", line):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        elif not line.startswith("|"):
            current = None
    return tables


def test_grouping_keys_are_the_fewest_options_that_separate_the_settings() -> None:
    tied = {"bn": (None, False, 1e-4), "gn": (4, True, 0.0), "ln": (None, True, 0.0)}
    records = [
        {"norm": n, "groups": g, "ws": w, "l1": l1, "batch_size": b, "seed": s}
        for n, (g, w, l1) in tied.items() for b in (8, 64) for s in (1, 2)
    ]  # fmt: skip
    assert grouping_keys(records) == ["norm", "batch_size"]
    one_size = [r for r in records if r["batch_size"] == 8]
    assert grouping_keys(one_size) == ["norm"]
    assert pooled_settings(one_size, ["norm"]) == {}
    assert pooled_settings(records, ["norm"]) == {"batch_size": ["8", "64"]}
    assert grouping_keys([r for r in one_size if r["norm"] == "bn"]) == []  # seeds only


def test_the_table_equals_eval_group_by_json(study: Study, cli) -> None:
    assert study.stdout.splitlines() == [str(study.out), str(study.out.with_suffix(".md"))]
    result = cli("eval", study.folder, "--group-by", "norm", "--json")
    assert result.exit_code == 0, result.stderr
    expected = json.loads(result.stdout)
    (table,) = Page(study.html).tables["comparison"]
    assert table["head"][:3] == ["norm", "group", "n"]
    assert [json.loads(r["attrs"]["data-group"]) for r in table["rows"]] == [
        {"norm": row["norm"]} for row in expected
    ]  # fmt: skip
    for row, doc in zip(table["rows"], expected, strict=True):
        cells = row["cells"]
        assert cells[2]["text"] == "3"
        for column, metric, digits in ((3, "test_accuracy", 2), (5, "test_loss", 4)):
            stats, shown, ci = doc[metric], cells[column], cells[column + 1]
            assert float(shown["attrs"]["data-mean"]) == stats["mean"]
            assert float(shown["attrs"]["data-std"]) == stats["std"]
            assert [float(ci["attrs"][f"data-{k}"]) for k in ("low", "high")] == stats["ci95"]
            assert shown["text"] == f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
            low, high = stats["ci95"]
            assert ci["text"] == f"[{low:.{digits}f}, {high:.{digits}f}]"
        # The interval by hand: the final accuracies in the files, t(0.975, 2) = 4.302653.
        finals = [read_metadata(study.folder / f"{name}_s{s}.safetensors").history[-1]
                  for name in RUNS if RUNS[name][1] == doc["norm"] for s in SEEDS]  # fmt: skip
        accs = [f["test_accuracy"] for f in finals]
        mean = sum(accs) / 3
        half = 4.302653 * math.sqrt(sum((a - mean) ** 2 for a in accs) / 2) / math.sqrt(3)
        assert doc["test_accuracy"]["ci95"] == pytest.approx([mean - half, mean + half])


def test_the_markdown_twin_has_the_same_tables_and_its_figures(study: Study) -> None:
    html_tables = [
        [t["head"], *([c["text"] for c in r["cells"]] for r in t["rows"])]
        for t in Page(study.html).all_tables()
    ]  # fmt: skip
    assert markdown_tables(study.markdown) == html_tables
    folder = study.out.with_name("study_figures")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", study.markdown)
    assert len(images) == len(list(folder.glob("*.svg"))) == 3 + 2 * len(RUNS)
    for link in images:
        root = ElementTree.parse(study.out.parent / link).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_the_runs_table_follows_the_comparison_groups_then_the_seed(study: Study, tmp_path):
    # File names that sort against the groups and the seeds: the table must not follow them.
    folder = tmp_path / "renamed"
    folder.mkdir()
    for path in study.folder.glob("*.safetensors"):
        name, seed = path.stem.rsplit("_s", 1)
        shutil.copy(path, folder / f"{9 - int(seed)}_{'zyx'[list(RUNS).index(name)]}.safetensors")
    out = tmp_path / "renamed.html"
    result = run_cli("report", folder, "--out", out, "--no-eval")
    assert result.exit_code == 0, result.stderr
    page = Page(out.read_text())
    (comparison,) = page.tables["comparison"]
    group_column = comparison["head"].index("group")
    order = [r["cells"][group_column]["text"] for r in comparison["rows"]]
    (runs,) = [t for t in page.tables["run"] if t["head"][:3] == ["run", "group", "seed"]]
    listed = [(r["cells"][1]["text"], int(r["cells"][2]["text"])) for r in runs["rows"]]
    assert listed == [(group, seed) for group in order for seed in SEEDS]


def test_wall_time_is_the_union_of_the_runs_intervals(tiny_checkpoints: dict) -> None:
    meta = load_checkpoint(tiny_checkpoints["gn"]).meta
    assert meta.started is not None and meta.started <= meta.created

    def ran(start: int, end: int) -> CheckpointMeta:  # minutes past midnight
        return dataclasses.replace(meta, started=f"2026-01-01T00:{start:02d}:00+00:00",
                                   created=f"2026-01-01T00:{end:02d}:00+00:00")  # fmt: skip

    unknown = [dataclasses.replace(meta, started=s) for s in (None, "yesterday", "2026-01-01")]
    runs = [ran(20, 30), ran(0, 10), ran(5, 12), ran(6, 8), *unknown]
    assert wall_seconds(runs) == (22 * 60.0, 4)  # 0-12 and 20-30: side by side counts once
    text = wall_time_text(runs)
    assert text.startswith("1,320 s (22.0 min)") and "3 of 7 runs" in text
    assert wall_time_text(unknown).startswith("not recorded")


def test_differences_read_welch_intervals_in_plain_words(study: Study, cli) -> None:
    expected = {r["norm"]: r["test_accuracy"] for r in json.loads(
        cli("eval", study.folder, "--group-by", "norm", "--json").stdout)}  # fmt: skip
    (table,) = Page(study.html).tables["differences"]
    pairs = [("bn", "gn"), ("bn", "ln"), ("gn", "ln")]
    assert len(table["rows"]) == len(pairs)
    for row, (a, b) in zip(table["rows"], pairs, strict=True):
        sa, sb = expected[a], expected[b]
        va, vb = sa["std"] ** 2 / 3, sb["std"] ** 2 / 3
        df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
        diff, half = sa["mean"] - sb["mean"], t_quantile(0.975, df) * math.sqrt(va + vb)
        _, estimate, ci, reading = row["cells"]
        assert float(estimate["attrs"]["data-mean"]) == pytest.approx(diff)
        assert float(ci["attrs"]["data-low"]) == pytest.approx(diff - half)
        assert float(ci["attrs"]["data-high"]) == pytest.approx(diff + half)
        if diff - half <= 0 <= diff + half:
            assert "no difference at n = 3" in reading["text"]
        else:
            text = reading["text"]
            assert "higher than" in text and f"by {abs(diff):.2f} points" in text


def test_the_page_is_self_contained_and_says_what_was_run(study: Study) -> None:
    page = Page(study.html)
    tags = [tag for tag, _ in page.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    csp = [a for tag, a in page.tags if tag == "meta" and a.get("http-equiv")]
    assert csp == [{"http-equiv": "Content-Security-Policy", "content": CONTENT_SECURITY_POLICY}]
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "action", "poster"):
            if name in attrs:
                assert attrs[name].startswith("data:image/svg+xml;base64," if name == "src"
                                              else "#"), (tag, attrs[name])  # fmt: skip
    assert sum(tag == "img" for tag in tags) == 3 + 2 * len(RUNS)
    # What was run: the versions and this machine (recorded by training), the commands.
    assert cpu_model() in study.html and torch.__version__ in study.html
    for name in RUNS:
        assert f"--out {study.folder / f'{name}_s2.safetensors'}" in study.html


def test_a_reproduce_command_trains_the_same_weights(study: Study, tiny_data: Path, tmp_path):
    original = study.folder / "gn_s2.safetensors"
    again = tmp_path / "again.safetensors"
    command = train_command(read_metadata(original), again)
    assert command.startswith("normcli train --dataset mnist --norm gn --groups 2 ")
    args = shlex.split(command)[1:]
    result = run_cli(*args, "--data-dir", tiny_data, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    (_, first), (_, second) = read_file(original), read_file(again)
    weights = [k for k in first if k.startswith("model.")]
    assert weights and all(torch.equal(first[k], second[k]) for k in weights)


def test_a_sweep_is_reproduced_by_one_sweep_command_that_reads_back_the_same_grid() -> None:
    from normcli.cli.sweep import sweep_grid
    from normcli.sweep import new_manifest

    swept = {"norm": ["bn", "gn"], "seed": [1, 2], "lr": [0.05, 0.1]}
    fixed = {"epochs": 2, "augment": False, "l1": 1e-05, "limit": None, "threads": 1}
    command = sweep_command(new_manifest(swept, fixed), "runs/x")
    assert command == ("normcli sweep --norm bn,gn --seed 1,2 --lr 0.05,0.1 --epochs 2 "
                       "--augment false --l1 1e-05 --threads 1 --out runs/x")  # fmt: skip
    words = shlex.split(command)[2:-2]
    pairs = zip(words[::2], words[1::2], strict=True)
    options = {flag[2:].replace("-", "_"): value for flag, value in pairs}
    again_swept, again_fixed, _ = sweep_grid(options, threads=1)
    assert again_swept == swept and again_fixed == {k: v for k, v in fixed.items() if v is not None}


def test_runs_pooled_across_settings_get_a_loud_note(study: Study, cli, tmp_path) -> None:
    out = tmp_path / "pooled.html"
    result = cli("report", study.folder, "--group-by", "dataset", "--no-eval", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "normcli: warning: Runs with different settings are pooled" in result.stderr
    notes = re.findall(r'<p class="warning">(.*?)</p>', out.read_text(), re.S)
    assert len(notes) == 1 and "norm (bn, gn, ln)" in notes[0]


def test_report_refuses_bad_outputs_before_any_work(study: Study, cli, tmp_path) -> None:
    out = tmp_path / "r.html"
    out.write_text("keep me")
    result = cli("report", study.folder, "--no-eval", "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert out.read_text() == "keep me"
    result = cli("report", study.folder, "--no-eval", "--out", tmp_path / "r.png")
    assert result.exit_code == 2 and "name an .html file" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    result = cli("report", study.folder, "--no-eval", "--out", out, "--overwrite")
    assert result.exit_code == 0 and "Confusion matrices and misclassified images: not" in (
        out.read_text()
    )


# --- in a real browser --------------------------------------------------------------------------

NO_BROWSER = "NORMCLI_NO_BROWSER"  # set where no browser can be installed; never in CI


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium: a missing browser fails the test unless $NORMCLI_NO_BROWSER says."""
    if os.environ.get(NO_BROWSER):
        pytest.skip(f"${NO_BROWSER} is set: no browser here")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(f"chromium not found: apt-get install -y chromium (or set ${NO_BROWSER}=1)")
    return found


def run_chromium(browser: str, page: Path, *args: str) -> tuple[str, list[str]]:
    """Open `page` from a file:// URL in headless chromium, offline; its stdout and the
    console messages it logged."""
    profile = page.parent / f".{page.stem}-profile"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--window-size=1280,3000", "--hide-scrollbars", "--virtual-time-budget=5000",
               *args, page.resolve().as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


# Runs in the page before anything loads: records every CSP violation and error, and after
# the load event every image's decoded and displayed size, into <pre id="probe">.
PROBE = """(() => {
  const problems = [];
  document.addEventListener('securitypolicyviolation',
    e => problems.push(e.violatedDirective + ' ' + e.blockedURI));
  window.addEventListener('error',
    e => problems.push('error ' + (e.message || e.target.src || e.target)), true);
  window.addEventListener('load', () => {
    const images = [...document.images].map(i => {
      const box = i.getBoundingClientRect();
      return {alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
              shown: [box.width, box.height]};
    });
    const out = document.createElement('pre');
    out.id = 'probe';
    out.textContent = JSON.stringify({images, problems});
    document.body.appendChild(out);
  });
})();"""


def probed(page_text: str, folder: Path, name: str) -> Path:
    """A copy of the page with PROBE allowed by its hash in the page's own policy (which
    still forbids every request) and run first."""
    digest = base64.b64encode(hashlib.sha256(PROBE.encode()).digest()).decode()
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page_text)
    assert html.unescape(meta.group(1)) == CONTENT_SECURITY_POLICY
    policy = html.escape(f"{CONTENT_SECURITY_POLICY}; script-src 'sha256-{digest}'")
    replacement = (f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
                   f"<script>{PROBE}</script>")  # fmt: skip
    path = folder / name
    path.write_text(page_text.replace(meta.group(0), replacement, 1), encoding="utf-8")
    return path


def probe(browser: str, page: Path) -> tuple[dict, list[str]]:
    stdout, console = run_chromium(browser, page, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', stdout, re.S)
    assert found, "the probe did not run"
    return json.loads(html.unescape(found.group(1))), console


def test_every_figure_renders_in_chromium_with_no_request_and_no_error(
    study: Study, chromium: str, tmp_path: Path
) -> None:
    result, console = probe(chromium, probed(study.html, tmp_path, "page.html"))
    assert result["problems"] == [] and console == []
    assert len(result["images"]) == 3 + 2 * len(RUNS)
    for image in result["images"]:
        assert image["complete"], image["alt"]
        assert min(image["natural"]) > 100 and min(image["shown"]) > 100, image

    # The probe sees what it is there to see: a page that asks for anything is caught.
    leaky = study.html.replace("</body>", '<img src="https://example.invalid/x.png"></body>')
    result, console = probe(chromium, probed(leaky, tmp_path, "leaky.html"))
    assert sorted(result["problems"]) == [
        "error https://example.invalid/x.png", "img-src https://example.invalid/x.png"
    ]
    assert any("violates the following Content Security Policy" in line for line in console)


def test_the_page_as_written_shows_its_figures_with_a_clean_console(
    study: Study, chromium: str, tmp_path: Path
) -> None:
    from PIL import Image

    shot = tmp_path / "page.png"
    _, console = run_chromium(chromium, study.out, f"--screenshot={shot}")
    assert console == []  # no policy violation, no error: nothing was even attempted
    with Image.open(shot) as image:
        assert image.size == (1280, 3000)
        colours = image.convert("RGB").getcolors(maxcolors=2**24)  # [(count, colour)]
    # Not blank: figures and tables put hundreds of colours on a good part of the screen.
    white = sum(count for count, colour in colours if colour == (255, 255, 255))
    assert len(colours) > 500 and white < 0.95 * 1280 * 3000
