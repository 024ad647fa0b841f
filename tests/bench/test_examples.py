"""examples/compare_norms.sh end to end on tiny data; the committed results still load."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_scripts import REPO

from normcli.checkpoint import load_checkpoint, read_metadata


def test_compare_norms_script(tiny_data, tmp_path, cli):
    out = tmp_path / "study"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["OMP_NUM_THREADS"] = "1"
    # A relative --data-dir, as a user types it: taken from the current folder.
    cmd = ["bash", str(REPO / "examples" / "compare_norms.sh"), "mnist", "--epochs", "1",
           "--data-dir", tiny_data.name, "--out", str(out), "--device", "cpu"]  # fmt: skip
    run = functools.partial(subprocess.run, cmd, capture_output=True, text=True, env=env,
                            timeout=300, cwd=tiny_data.parent)  # fmt: skip
    result = run()
    assert result.returncode == 0, result.stderr
    runs = ["bn_l1", "gn", "ln"]
    for name in runs:
        meta = read_metadata(out / f"{name}.safetensors")
        assert len(meta.history) == 1
        # Three trainings share the terminal: each line says whose it is.
        assert re.search(rf"^{name}  epoch +1  train loss", result.stderr, re.M)
        assert re.search(rf"^{name}: [\d,]+ params; final test accuracy", result.stderr, re.M)
    assert read_metadata(out / "bn_l1.safetensors").train_args.l1 == 1e-4
    reports = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in reports] == runs
    assert [r["label"] for r in reports] == ["BN + L1 (1e-4)", "GN (G=4) + WS", "LN + WS"]
    table = (out / "eval.md").read_text()
    assert table.count("\n| ") == 4 and "train gn:" in (out / "log.txt").read_text()
    assert result.stdout.rstrip().endswith(
        f"report: {out}/report.html (Markdown: {out}/report.md)"
    )
    page = (out / "report.html").read_text()
    assert all(label in page for label in ("BN + L1 (1e-4)", "GN (G=4) + WS", "LN + WS"))
    assert len(list((out / "report_figures").glob("*.svg"))) == 3 + 2 * len(runs)
    assert not list(out.glob("*.png"))  # the figures are the report's
    # `normcli plot` beside the study's checkpoints does not meet a figure of the study's.
    plotted = cli("plot", *(out / f"{name}.safetensors" for name in runs))
    assert plotted.exit_code == 0 and plotted.stdout.strip() == str(out / "curves.png")

    # A second run resumes (finished runs are kept) and refreshes the outputs.
    again = run()
    assert again.returncode == 0, again.stderr
    assert len(read_metadata(out / "gn.safetensors").history) == 1


def test_compare_norms_checks_the_data_once_and_creates_nothing_before(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "study"
    cmd = ["bash", str(REPO / "examples" / "compare_norms.sh"), "mnist", "--epochs", "1",
           "--data-dir", str(blocker / "data"), "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("normcli: error: mnist not found in")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no study folder


COMMITTED = sorted((REPO / "bench" / "results").rglob("*.safetensors"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_committed_checkpoint_still_loads_and_runs(path: Path) -> None:
    """The results are there to be re-checked with `normcli eval`: a model change that
    strands them (as moving cifar_net's last conv would have) fails here."""
    ckpt = load_checkpoint(path)
    with torch.no_grad():
        logits = ckpt.model.eval()(torch.zeros(2, *ckpt.meta.input_shape))
    assert logits.shape == (2, len(ckpt.meta.class_names))
    assert len(ckpt.meta.history) == ckpt.meta.train_args.epochs


def test_study_checkpoints_are_committed() -> None:
    names = {str(p.relative_to(REPO / "bench" / "results")) for p in COMMITTED}
    for dataset in ("mnist", "cifar10"):
        assert {f"{dataset}/{run}.safetensors" for run in ("bn_l1", "gn", "ln")} <= names
