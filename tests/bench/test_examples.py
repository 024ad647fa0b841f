"""examples/compare_norms.sh end to end on tiny data; the committed results still load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_scripts import REPO

from normcli.checkpoint import load_checkpoint, read_metadata


def test_compare_norms_script(tiny_data, tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = ["bash", str(REPO / "examples" / "compare_norms.sh"), "mnist", "--epochs", "1",
           "--data-dir", str(tiny_data), "--out", str(out), "--device", "cpu"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = ["bn_l1", "gn", "ln"]
    for name in runs:
        meta = read_metadata(out / f"{name}.safetensors")
        assert len(meta.history) == 1
        assert (out / f"misclassified_{name}.png").read_bytes().startswith(b"\x89PNG")
    assert read_metadata(out / "bn_l1.safetensors").train_args.l1 == 1e-4
    for figure in ("curves.png", "test_loss.png", "test_accuracy.png"):
        assert (out / figure).read_bytes().startswith(b"\x89PNG")
    reports = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in reports] == runs
    assert [r["label"] for r in reports] == ["BN + L1 (1e-4)", "GN (G=4) + WS", "LN + WS"]
    table = (out / "eval.md").read_text()
    assert table.count("\n| ") == 4 and "train gn:" in (out / "log.txt").read_text()

    # A second run resumes (finished runs are kept) and refreshes the outputs.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(read_metadata(out / "gn.safetensors").history) == 1


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
