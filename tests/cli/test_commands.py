"""eval, misclassified, plot and summary through the CLI, checked against independent numbers."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from normcli.checkpoint import load_checkpoint, read_metadata
from normcli.data import read_cifar_bin, read_idx
from normcli.models import build_model


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", raw[16:24])


def independent_logits(ckpt_path: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels computed without normcli's evaluation code."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.meta.dataset == "mnist":
        images = read_idx(data / "MNIST" / "raw" / "t10k-images-idx3-ubyte")[:, None]
        labels = read_idx(data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").long()
    else:
        split = read_cifar_bin(data / "cifar-10-batches-bin" / "test_batch.bin")
        images, labels = split.images, split.labels
    mean = torch.tensor(ckpt.meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(ckpt.meta.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = ckpt.model.eval()((images.float() / 255 - mean) / std)
    return logits, labels




def test_eval_json_matches_independent_computation(cli, tiny_data, tiny_checkpoints):
    paths = [tiny_checkpoints["bn_l1"], tiny_checkpoints["cifar"]]
    result = cli("eval", *paths, "--data-dir", tiny_data, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [r["path"] for r in reports] == [str(p) for p in paths]
    for path, rep in zip(paths, reports, strict=True):
        logits, labels = independent_logits(path, tiny_data)
        pred = logits.argmax(1)
        m = rep["metrics"]
        assert m["total"] == len(labels)
        assert m["correct"] == int((pred == labels).sum())
        assert m["wrong"] == int((pred != labels).sum())
        assert m["accuracy"] == pytest.approx(100 * (pred == labels).float().mean().item())
        assert m["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        for true in range(10):
            for p in range(10):
                expected = int(((labels == true) & (pred == p)).sum())
                assert m["confusion"][true][p] == expected
            n_true = int((labels == true).sum())
            hits = int(((labels == true) & (pred == true)).sum())
            assert m["per_class_accuracy"][true] == pytest.approx(100 * hits / n_true)
        history = read_metadata(path).history
        assert rep["final_accuracy"] == history[-1]["test_accuracy"]
        assert rep["best_accuracy"] == max(r["test_accuracy"] for r in history)
        params = sum(p.numel() for p in load_checkpoint(path).model.parameters())
        assert rep["params"] == params


def test_eval_table_and_confusion_png(cli, tiny_data, tiny_checkpoints, tmp_path):
    out = tmp_path / "confusion.png"
    ckpt = tiny_checkpoints["gn"]
    result = cli("eval", ckpt, "--data-dir", tiny_data, "--confusion", out)
    assert result.exit_code == 0, result.stderr
    assert str(out) in result.stdout.splitlines()
    logits, labels = independent_logits(ckpt, tiny_data)
    wrong = int((logits.argmax(1) != labels).sum())
    assert f"Total incorrect predictions: {wrong}" in result.stdout
    width, height = png_size(out)
    assert width > 300 and height > 300


def test_eval_markdown_has_one_row_per_checkpoint(cli, tiny_data, tiny_checkpoints):
    paths = [tiny_checkpoints[k] for k in ("bn_l1", "gn", "ln")]
    result = cli("eval", *paths, "--data-dir", tiny_data, "--markdown")
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 3  # header, rule, one per run
    assert "BN + L1 (1e-4)" in rows[2] and "GN (G=2) + WS" in rows[3] and "LN + WS" in rows[4]


@pytest.mark.parametrize(("n", "cols", "sort"), [(10, 5, "index"), (7, 3, "confidence")])
def test_misclassified_grid(
    cli, tiny_data, tiny_checkpoints, tmp_path, captured_figures, n, cols, sort
):
    ckpt = tiny_checkpoints["ln"]
    out = tmp_path / "grid.png"
    args = ["misclassified", ckpt, "--n", n, "--cols", cols, "--sort", sort, "--out", out]
    result = cli(*args, "--data-dir", tiny_data, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert len(doc) == 1 and doc[0]["output"] == str(out)
    listed = doc[0]["misclassified"]

    logits, labels = independent_logits(ckpt, tiny_data)
    pred = logits.argmax(1)
    wrong = (pred != labels).nonzero().flatten()
    expected = min(n, len(wrong))
    assert len(listed) == expected
    names = read_metadata(ckpt).class_names
    for item in listed:
        i = item["index"]
        assert pred[i] != labels[i], f"image {i} is not misclassified"
        assert item["true"] == names[labels[i]] and item["predicted"] == names[pred[i]]
        assert item["probability"] == pytest.approx(logits[i].softmax(0).max().item(), rel=1e-4)
    indices = [item["index"] for item in listed]
    if sort == "index":
        assert indices == wrong[:n].tolist()
    else:
        probs = [item["probability"] for item in listed]
        assert probs == sorted(probs, reverse=True)

    rows = -(-expected // cols)
    assert png_size(out) == (cols * 160, rows * 190 + 90)
    (fig,) = captured_figures
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == expected
    assert "LN" in fig._suptitle.get_text() and "MNIST" in fig._suptitle.get_text()


def test_misclassified_several_checkpoints_one_grid_each(
    cli, tiny_data, tiny_checkpoints, tmp_path
):
    paths = [tiny_checkpoints["bn_l1"], tiny_checkpoints["cifar"]]
    result = cli("misclassified", *paths, "--n", "4", "--out", tmp_path, "--data-dir", tiny_data)
    assert result.exit_code == 0, result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    assert written == [tmp_path / f"{p.stem}_misclassified_n4_index.png" for p in paths]
    assert all(png_size(p)[0] > 0 for p in written)


def test_misclassified_fewer_than_asked(cli, tiny_data, tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["gn"]
    logits, labels = independent_logits(ckpt, tiny_data)
    wrong = int((logits.argmax(1) != labels).sum())
    out = tmp_path / "all.png"
    result = cli("misclassified", ckpt, "--n", "1000", "--out", out, "--data-dir", tiny_data)
    assert result.exit_code == 0, result.stderr
    assert f"only {wrong} of" in " ".join(result.stderr.split())


def test_plot_default_grid_uses_histories(cli, tiny_checkpoints, tmp_path, captured_figures):
    paths = [tiny_checkpoints[k] for k in ("bn_l1", "gn", "ln")]
    out = tmp_path / "curves.png"
    result = cli("plot", *paths, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert png_size(out)[0] > 0
    (fig,) = captured_figures
    assert [ax.get_title() for ax in fig.axes] == [
        "Test loss", "Test accuracy", "Train loss", "Train accuracy"
    ]  # fmt: skip
    metrics = ["test_loss", "test_accuracy", "train_loss", "train_accuracy"]
    for ax, metric in zip(fig.axes, metrics, strict=True):
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["BN + L1 (1e-4)", "GN (G=2) + WS", "LN + WS"]
        assert ax.get_xlabel().split("\n")[0] == "epoch"  # a zoomed axis adds a note
        assert ("%" in ax.get_ylabel()) == metric.endswith("accuracy")
        for line, path in zip(ax.get_lines(), paths, strict=True):
            history = read_metadata(path).history
            assert list(line.get_xdata()) == [row["epoch"] for row in history]
            assert list(line.get_ydata()) == [row[metric] for row in history]


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_plot_single_metric_formats(cli, tiny_checkpoints, tmp_path, captured_figures, fmt):
    paths = [tiny_checkpoints["bn_l1"], tiny_checkpoints["ln"]]
    args = ["plot", *paths, "--metric", "test_loss", "--metric", "test_accuracy"]
    result = cli(*args, "--format", fmt, "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    assert written == [tmp_path / f"test_loss.{fmt}", tmp_path / f"test_accuracy.{fmt}"]
    magic = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}[fmt]
    assert all(p.read_bytes().startswith(magic) for p in written)
    assert [len(f.axes) for f in captured_figures] == [1, 1]
    ax = captured_figures[0].axes[0]
    history = read_metadata(paths[1]).history
    assert list(ax.get_lines()[1].get_ydata()) == [row["test_loss"] for row in history]


def test_plot_refuses_to_overwrite(cli, tiny_checkpoints, tmp_path):
    out = tmp_path / "curves.png"
    out.write_bytes(b"keep me")
    result = cli("plot", tiny_checkpoints["gn"], "--out", out)
    assert result.exit_code == 2
    assert "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep me"
    assert cli("plot", tiny_checkpoints["gn"], "--out", out, "--overwrite").exit_code == 0
    assert png_size(out)[0] > 0


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in", "none"])
@pytest.mark.parametrize("model", ["mnist_net", "cifar_net"])
def test_summary_totals_equal_parameter_count(cli, model, norm):
    result = cli("summary", "--model", model, "--norm", norm, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    expected = sum(p.numel() for p in build_model(model, norm=norm).parameters())
    assert doc["total_params"] == expected
    assert doc["input_shape"][1:] == ([1, 28, 28] if model == "mnist_net" else [3, 32, 32])
    assert doc["mult_adds"] > 0
    table = cli("summary", "--model", model, "--norm", norm)
    assert f"Total params: {expected:,}" in table.stdout


def test_summary_of_checkpoint_compare_and_list(cli, tiny_checkpoints):
    result = cli("summary", tiny_checkpoints["gn"], "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["model"], doc["norm"], doc["groups"]) == ("mnist_net", "gn", 2)
    model = load_checkpoint(tiny_checkpoints["gn"]).model
    assert doc["total_params"] == sum(p.numel() for p in model.parameters())

    compare = json.loads(cli("summary", "--model", "mnist_net", "--compare", "--json").stdout)
    for norm, count in compare["params"].items():
        assert count == sum(p.numel() for p in build_model("mnist_net", norm=norm).parameters())
    assert compare["params"]["bn"] == compare["params"]["none"] + 2 * (8 + 16 + 8 + 12 + 16 * 3)

    listing = json.loads(cli("summary", "--list", "--json").stdout)
    rows = {r["name"]: r for r in listing}
    assert set(rows) == {"mnist_net", "mnist_net_w16", "cifar_net", "cifar_net_p4"}
    assert [n for n, r in rows.items() if r["default"]] == ["cifar_net", "mnist_net"]
    assert {n: r["default_groups"] for n, r in rows.items()} == {
        "cifar_net": 2, "cifar_net_p4": 4, "mnist_net": 4, "mnist_net_w16": 4
    }  # fmt: skip
    assert rows["mnist_net_w16"]["valid_groups"] == [1, 2, 4, 8, 16]


def test_tables_piped_without_a_terminal_width_are_not_squeezed(monkeypatch) -> None:
    from normcli.console import PIPE_WIDTH, _console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert _console(file=io.StringIO()).width == PIPE_WIDTH  # rich alone would say 80
    monkeypatch.setenv("COLUMNS", "70")
    assert _console(file=io.StringIO()).width == 70


@pytest.mark.parametrize(
    "args",
    [
        ["summary", "--model", "resnet9000"],
        ["summary", "--model", "mnist_net", "--norm", "batchnorm"],
        ["summary"],
        ["eval", "missing.safetensors"],
        ["misclassified", "missing.safetensors"],
        ["plot", "missing.safetensors"],
    ],
)
def test_bad_input_is_one_line_exit_2(cli, args, tmp_path):
    result = cli(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normcli: error:")
    assert "Traceback" not in result.stderr


def test_bad_checkpoint_files_exit_2(cli, tmp_path):
    from safetensors.torch import save_file

    not_st = tmp_path / "notes.safetensors"
    not_st.write_text("hello, I am not a tensor file")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    for path, words in ((not_st, "not a safetensors"), (plain, "no normcli metadata")):
        for command in ("eval", "misclassified", "plot", "summary"):
            result = cli(command, path)
            assert result.exit_code == 2, (command, result.stderr)
            assert words in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1


# --- one declaration per run option ------------------------------------------------------------


def test_a_run_option_is_one_dataclass_field(tmp_path: Path) -> None:
    """A field with metadata is a whole run option: its flag and help in `train` (switch or
    typed) and `sweep` (a list), its tag in the default name, its range, its old value."""
    import dataclasses
    import typing

    from normcli.cli.options import run_option_parameters
    from normcli.config import ModelArgs, RunSpec, TrainArgs, option, with_added_fields
    from normcli.errors import NormcliError

    @dataclasses.dataclass(frozen=True)
    class Extra(TrainArgs):
        warmup: float = option(
            0.25, "Warm-up share.", tag="wu", check=(lambda v: 0 <= v < 1, "in [0, 1)"),
            before=0.0,
        )  # fmt: skip

    records = (ModelArgs, Extra)
    for as_lists, kind in ((False, float), (True, str | None)):
        params = {p.name: p for p in run_option_parameters(as_lists, records)}
        option_type, info = typing.get_args(params["warmup"].annotation)
        assert (option_type, info.help) == (kind, "Warm-up share.")
        assert "--warmup" in (info.default, *info.param_decls)  # Annotated: decls come first
        assert params["warmup"].default == (None if as_lists else 0.25)
    assert "warmup" not in {p.name for p in run_option_parameters()}  # TrainArgs is untouched
    model = ModelArgs().resolve()
    assert Extra().resolve(model).warmup == 0.25
    changed = RunSpec(model, Extra(warmup=0.5).resolve(model)).default_path().name
    assert changed == "mnist_mnist_net_bn_wu0.5_s1.safetensors"
    unchanged = RunSpec(model, Extra().resolve(model)).default_path().name
    assert unchanged == "mnist_mnist_net_bn_s1.safetensors"
    with pytest.raises(NormcliError, match=r"^warmup must be in \[0, 1\), got 2$"):
        Extra(warmup=2).resolve(model)
    assert with_added_fields(Extra, {"seed": 3})["warmup"] == 0.0
    assert with_added_fields(Extra, {"warmup": 0.5})["warmup"] == 0.5


def test_adding_a_field_to_train_args_needs_no_other_edit(tmp_path: Path) -> None:
    """A copy of the package whose TrainArgs has one more field (and no other change) shows
    it in `train --help`, `sweep --help` and the default checkpoint name."""
    import os
    import shutil
    import subprocess
    import sys

    import normcli

    copy = tmp_path / "normcli"
    shutil.copytree(Path(normcli.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    config = copy / "config.py"
    anchor = "    @property\n    def per_process_batch"
    field = '    warmup: float = option(0.25, "Warm-up share of the schedule.", tag="wu")\n\n'
    assert config.read_text().count(anchor) == 1
    config.write_text(config.read_text().replace(anchor, field + anchor))
    script = (
        "import normcli, sys\n"
        "from normcli.cli import main\n"
        "from normcli.config import RunSpec\n"
        "print(normcli.__file__)\n"
        "for command in ('train', 'sweep'):\n"
        "    assert main([command, '--help']) == 0\n"
        "print(RunSpec.from_options(warmup=0.5, epochs=2).resolve().default_path())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(copy / "__init__.py")
    helps = [line for line in lines if "--warmup" in line]
    assert len(helps) == 2 and all("Warm-up share of the schedule." in h for h in helps), helps
    assert "<float>" in helps[0] and "default: 0.25" in helps[0]  # train: a number
    assert "<str>" in helps[1] and "default" not in helps[1]  # sweep: a comma list
    assert lines[-1] == "checkpoints/mnist_mnist_net_bn_e2_wu0.5_s1.safetensors"


def test_data_checks_both_splits_and_prints_the_folder(tiny_data, cli) -> None:
    from conftest import TINY_TEST, TINY_TRAIN

    result = cli("data", "mnist", "--data-dir", tiny_data, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"dataset": "mnist", "data_dir": str(tiny_data.resolve()),
                                         "train": TINY_TRAIN, "test": TINY_TEST}  # fmt: skip
    assert cli("data", "mnist", "--data-dir", tiny_data).stdout.strip() == str(tiny_data.resolve())


def test_data_with_no_files_offline_is_one_line_and_creates_nothing(tmp_path, cli) -> None:
    from conftest import OFFLINE

    where = tmp_path / "nowhere"
    result = cli("data", "cifar10", "--data-dir", where, env=OFFLINE)
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "cifar10" in result.stderr.lower()
    assert not where.exists()
