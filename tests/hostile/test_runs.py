"""Training runs meeting hostile numbers and neighbours: divergence, option ranges, two
processes on one output, `--out` folders, the recorded thread count, history export."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normcli
from normcli.checkpoint import load_checkpoint, read_file, read_metadata

QUICK = ("--epochs", "2", "--batch-size", "50", "--device", "cpu")


def test_a_diverging_run_stops_with_one_line_and_keeps_no_nan(
    cli, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "boom.safetensors"
    result = cli(
        "train", "--data-dir", tiny_data, *QUICK, "--norm", "none", "--lr", "1e10", "--out", out
    )
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "diverged in epoch 1" in lines[0]
    assert "lower learning rate" in lines[0]
    assert result.stdout == ""
    assert not out.exists()  # nothing finite was ever reached: nothing saved


def test_divergence_after_a_good_epoch_keeps_that_epoch(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normcli import train as training
    from normcli.config import RunSpec
    from normcli.errors import NormcliError

    original = training.train_epoch

    def second_epoch_explodes(run, reporter=None):  # noqa: ANN001, ANN202
        if run.epoch == 1:
            with torch.no_grad():
                for p in run.model.parameters():
                    p.fill_(float("nan"))
        return original(run, reporter)

    monkeypatch.setattr(training, "train_epoch", second_epoch_explodes)
    out = tmp_path / "half.safetensors"
    spec = RunSpec.from_options(epochs=3, batch_size=50)
    with pytest.raises(NormcliError, match="diverged in epoch 2.*epochs 1-1 are kept|epoch 2"):
        training.train(spec, data_dir=tiny_data, device="cpu", out=out)
    ckpt = load_checkpoint(out)
    assert len(ckpt.meta.history) == 1
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--momentum", "1.5", "--momentum must be in [0, 1)"),
        ("--momentum", "-0.1", "--momentum must be in [0, 1)"),
        ("--seed", str(2**70), "--seed must be in 0.."),
        ("--seed", "-1", "--seed must be in 0.."),
        ("--threads", "0", "--threads must be in 1..1024"),
        ("--val", "-3", "--val must be"),
        ("--val", "500", "leaves no training images"),
        ("--lr", "nan", "--lr must be positive"),
        ("--weight-decay", "inf", "--weight-decay must be a non-negative number"),
    ],
)
def test_options_have_ranges(
    cli, tiny_data: Path, tmp_path: Path, option: str, value: str, expected: str
) -> None:
    out = tmp_path / "x.safetensors"
    result = cli("train", "--data-dir", tiny_data, *QUICK, option, value, "--out", out)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not out.exists()


def test_a_nan_in_weights_is_refused_by_every_reader(cli, tiny_checkpoints, tmp_path) -> None:
    raw, tensors = read_file(tiny_checkpoints["gn"])
    tensors["model.head.bias"] = torch.full_like(tensors["model.head.bias"], float("nan"))
    from safetensors.torch import save_file

    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=raw)
    for args in (["eval", bad], ["summary", bad], ["misclassified", bad],
                 ["train", "--resume", bad]):  # fmt: skip
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert "holds NaN or infinite values" in result.stderr, args


def test_two_trainings_on_one_output_one_refuses(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "same.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(normcli.__file__).parents[1])}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "normcli", "train", "--data-dir", str(tiny_data),
           "--epochs", "6", "--batch-size", "20", "--device", "cpu", "--out", str(out),
           "--overwrite"]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    refused = next(err for p, (_, err) in zip(procs, results, strict=True) if p.returncode == 2)
    assert "being written by another normcli process" in refused
    assert len(read_metadata(out).history) == 6
    assert not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob("*.tmp"))


def test_out_folder_gets_the_default_name(cli, tiny_data: Path, tmp_path: Path) -> None:
    result = cli("train", "--data-dir", tiny_data, *QUICK, "--out", f"{tmp_path}/new/")
    assert result.exit_code == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == tmp_path / "new" and path.name.startswith("mnist_mnist_net_bn_e2_b50")
    assert path.is_file()
    # an existing folder without the slash: the same default name inside it
    again = cli("train", "--data-dir", tiny_data, *QUICK, "--out", tmp_path / "new", "--overwrite")
    assert again.exit_code == 0 and again.stdout.strip() == str(path)
    # a file path in a missing folder: the folder is made (after the data loaded)
    deep = tmp_path / "a" / "b" / "run.safetensors"
    made = cli("train", "--data-dir", tiny_data, *QUICK, "--out", deep)
    assert made.exit_code == 0 and deep.is_file()


def test_the_thread_count_is_recorded_and_reused(cli, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    before = torch.get_num_threads()
    result = cli("train", "--data-dir", tiny_data, *QUICK, "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert read_metadata(out).train_args.threads == 1
    assert torch.get_num_threads() == before  # restored for the rest of the process


def test_history_export_one_row_per_run_and_epoch(cli, tiny_checkpoints) -> None:
    paths = [tiny_checkpoints["gn"], tiny_checkpoints["ln"]]
    result = cli("history", *paths)
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["run"], int(r["epoch"])) for r in rows] == [("gn", 1), ("gn", 2), ("ln", 1),
                                                            ("ln", 2)]  # fmt: skip
    for row in rows:
        meta = read_metadata(row["path"])
        stored = meta.history[int(row["epoch"]) - 1]
        assert float(row["test_accuracy"]) == pytest.approx(stored["test_accuracy"])
        assert float(row["lr"]) == pytest.approx(stored["lr"])
        assert float(row["peak_lr"]) == pytest.approx(meta.train_args.lr)
        assert row["norm"] == meta.model_args.norm and row["label"] == meta.label
    doc = json.loads(cli("history", paths[0], "--json").stdout)
    assert len(doc) == 2 and doc[1]["epoch"] == 2


def test_json_output_never_holds_nan() -> None:
    from normcli.cli.printing import finite

    doc = {"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": "x"}
    text = json.dumps(finite(doc), allow_nan=False)
    assert json.loads(text) == {"a": [1.0, None], "b": {"c": None}, "d": "x"}
    assert not any(math.isnan(v) for v in [1.0])


@pytest.mark.parametrize("shape", [(0, 28, 28), (5, 0, 28), (0,)])
def test_idx_files_declaring_no_items_are_refused(tmp_path: Path, shape: tuple) -> None:
    from normcli.data import load_split, write_idx, write_synthetic
    from normcli.errors import NormcliError

    write_synthetic("mnist", tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    name = "t10k-images-idx3-ubyte" if len(shape) == 3 else "t10k-labels-idx1-ubyte"
    write_idx(raw / name, torch.zeros(shape, dtype=torch.uint8))
    with pytest.raises(NormcliError, match="declares an empty array"):
        load_split("mnist", False, tmp_path, download_missing=False)


def test_tensors_of_another_dataset_under_consistent_metadata(
    cli, tiny_data: Path, tiny_checkpoints, tmp_path: Path
) -> None:
    """cifar10 metadata (self-consistent) over mnist_net's tensors: refused before evaluating."""
    from safetensors.torch import save_file

    raw, _ = read_file(tiny_checkpoints["cifar"])
    _, mnist_tensors = read_file(tiny_checkpoints["bn_l1"])
    bad = tmp_path / "mixed.safetensors"
    save_file(mnist_tensors, str(bad), metadata=raw)
    result = cli("eval", bad, "--data-dir", tiny_data, "--device", "cpu")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensors do not match model cifar_net" in lines[0]
