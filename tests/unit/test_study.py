"""Studies pool only replicates: runs that differ outside the group keys are split (and said so),
`--where` chooses runs, and the study outputs (tables, CSV, Markdown, plots) hold what they say.

Checkpoints here are variants of one tiny trained run whose stored options and history are
rewritten (no training): their final metrics are known, so every statistic is checked against
an independent computation.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from normcli.checkpoint import read_file
from normcli.config import RUN_OPTIONS, ModelArgs
from normcli.console import to_markdown
from normcli.errors import NormcliError
from normcli.plots import curves_figure, study_figure
from normcli.study import aggregate, group_runs, select, split_keys


def history(*accuracies: float, loss: float = 0.5) -> list[dict[str, float]]:
    """A history whose epochs end at these test accuracies."""
    return [
        {"epoch": i + 1, "train_loss": loss, "train_accuracy": acc, "test_loss": loss,
         "test_accuracy": acc, "lr": 0.01, "seconds": 1.0, "images_per_second": 100.0}
        for i, acc in enumerate(accuracies)
    ]  # fmt: skip


def variant(source: Path, dest: Path, rows: list[dict], **options: Any) -> Path:
    """A copy of checkpoint `source` at `dest` with this history and these run options."""
    raw, tensors = read_file(source)
    raw = dict(raw or {})
    for key in ("model_args", "train_args"):
        args = json.loads(raw[key])
        mine = {k: v for k, v in options.items() if (RUN_OPTIONS[k] is ModelArgs) == (
            key == "model_args")}  # fmt: skip
        raw[key] = json.dumps({**args, **mine})
    raw["history"] = json.dumps(rows)
    raw["resume"] = json.dumps(None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest), metadata=raw)
    return dest


@pytest.fixture
def mixed(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """A folder of bn runs of 2 epochs (3 seeds, two thread counts), one bn run of 1 epoch and
    a gn run of 2 epochs: the newcomer's mix of a study and quick trials."""
    folder = tmp_path / "mixed"
    bn = tiny_checkpoints["bn_l1"]
    for seed, acc, threads in ((1, 90.0, 1), (2, 94.0, 2), (3, 95.0, 1)):
        variant(bn, folder / f"bn_s{seed}.safetensors", history(50.0, acc), seed=seed,
                epochs=2, threads=threads)  # fmt: skip
    variant(bn, folder / "bn_quick.safetensors", history(12.0), epochs=1)
    variant(tiny_checkpoints["gn"], folder / "gn_s1.safetensors", history(40.0, 80.0), epochs=2)
    return folder


# --- grouping --------------------------------------------------------------------------------


def test_runs_that_differ_outside_the_keys_are_split_not_pooled() -> None:
    runs = [
        {"norm": "bn", "epochs": 15, "seed": 1, "threads": 1, "test_accuracy": 98.0},
        {"norm": "bn", "epochs": 15, "seed": 2, "threads": 4, "test_accuracy": 99.0},
        {"norm": "bn", "epochs": 1, "seed": 1, "threads": 1, "test_accuracy": 10.0},
        {"norm": "gn", "epochs": 15, "seed": 1, "threads": 1, "test_accuracy": 97.0},
    ]
    for run in runs:
        run["test_loss"] = 0.1
    study = group_runs(runs, ["norm"], ["test_accuracy"])
    assert study.keys == ["norm", "epochs"] and study.split_by == ["epochs"]
    assert study.values == {"epochs": [1, 15]}
    got = {(r["norm"], r["epochs"]): r["test_accuracy"] for r in study.rows}
    assert got[("bn", 15)]["n"] == 2  # seeds and thread counts are pooled
    assert got[("bn", 15)]["mean"] == pytest.approx(statistics.mean([98.0, 99.0]))
    assert got[("bn", 15)]["std"] == pytest.approx(statistics.stdev([98.0, 99.0]))
    assert got[("bn", 1)]["mean"] == 10.0 and got[("gn", 15)]["n"] == 1
    assert "epochs (1, 15)" in study.describe_split() and study.example() == "epochs=15"
    # Pooling everything would have given the newcomer's mean of 69 over n=3.
    assert aggregate(runs, ["norm"], ["test_accuracy"])[0]["test_accuracy"]["n"] == 3


def test_an_option_that_follows_from_the_keys_does_not_split() -> None:
    runs = [
        {"dataset": d, "model": m, "num_classes": 10, "norm": "bn", "seed": s, "test_loss": 1.0}
        for d, m in (("mnist", "mnist_net"), ("cifar10", "cifar_net")) for s in (1, 2)
    ]  # fmt: skip
    assert split_keys(runs, ["norm"]) == ["dataset"]  # the model comes with the dataset
    assert split_keys(runs, ["norm", "dataset"]) == []
    assert split_keys(runs, ["seed"]) == ["dataset"]  # a key may be a pooled option


def test_eval_group_by_splits_and_warns(cli, mixed: Path) -> None:
    result = cli("eval", mixed, "--group-by", "norm", "--json")
    assert result.exit_code == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert warnings == [
        "normcli: warning: runs with the same norm differ in epochs (1, 2): grouped by those "
        "too; to keep some, e.g. --where epochs=2"
    ]
    rows = {(r["norm"], r["epochs"]): r["test_accuracy"] for r in json.loads(result.stdout)}
    assert set(rows) == {("bn", 2), ("bn", 1), ("gn", 2)}
    assert rows[("bn", 2)]["n"] == 3
    assert rows[("bn", 2)]["mean"] == pytest.approx(statistics.mean([90.0, 94.0, 95.0]))
    assert rows[("bn", 2)]["std"] == pytest.approx(statistics.stdev([90.0, 94.0, 95.0]))
    assert rows[("bn", 1)] == {"n": 1, "mean": 12.0, "std": None, "min": 12.0, "max": 12.0,
                               "ci95": None}

    chosen = cli("eval", mixed, "--group-by", "norm", "--where", "epochs=2", "--where",
                 "norm=bn,gn", "--json")  # fmt: skip
    assert chosen.exit_code == 0 and chosen.stderr == ""
    assert [(r["norm"], r["test_accuracy"]["n"]) for r in json.loads(chosen.stdout)] == [
        ("bn", 3), ("gn", 1),
    ]  # fmt: skip
    seeds = cli("eval", mixed, "--group-by", "seed", "--where", "norm=bn", "--where",
                "epochs=2", "--csv")  # fmt: skip
    table = list(csv.DictReader(io.StringIO(seeds.stdout)))
    assert [(r["seed"], float(r["test_accuracy_mean"])) for r in table] == [
        ("1", 90.0), ("2", 94.0), ("3", 95.0),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--group-by", ","), "group keys ',': a key is empty"),
        (("--group-by", "norm,"), "group keys 'norm,': a key is empty"),
        (("--group-by", "norm,norm"), "group key norm is given twice"),
        (("--group-by", "width"), "unknown group key width; available: dataset, model"),
        (("--group-by", "norm", "--where", "epochs=3"), "no run has epochs=3; epochs is 1, 2"),
        (("--where", "epochs"), "where condition 'epochs' is not KEY=VALUE"),
        (("--where", "speed=3"), "unknown key speed"),
        (("--json", "--csv"), "give one of --json, --markdown, --csv"),
    ],
)
def test_bad_study_requests_are_one_line(cli, mixed: Path, args: tuple, line: str) -> None:
    result = cli("eval", mixed, *args)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], result.stderr
    assert result.stdout == ""


def test_select_matches_values_as_typed() -> None:
    runs = [{"lr": 0.05, "limit": None, "augment": True, "norm": "bn", "epochs": 15},
            {"lr": 0.1, "limit": 500, "augment": False, "norm": "gn", "epochs": 1}]  # fmt: skip
    assert select(runs, ["lr=5e-2"]) == [runs[0]]
    assert select(runs, ["limit=none"]) == [runs[0]] and select(runs, ["limit=500"]) == [runs[1]]
    assert select(runs, ["augment=false"]) == [runs[1]]
    assert select(runs, ["epochs=15.0", "norm=bn"]) == [runs[0]]
    assert select(runs, ["norm=gn,bn"]) == runs
    with pytest.raises(NormcliError, match="no run has norm=ln; norm is bn, gn there"):
        select(runs, ["norm=ln"])


def test_runs_without_a_finished_epoch_or_a_metric_are_named(
    cli, mixed: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    variant(tiny_checkpoints["gn"], mixed / "gn_empty.safetensors", [], epochs=2)
    result = cli("eval", mixed, "--group-by", "norm", "--where", "epochs=2", "--json")
    assert result.exit_code == 0, result.stderr
    assert "no finished epoch in gn_empty.safetensors: left out" in result.stderr
    assert {r["norm"]: r["test_accuracy"]["n"] for r in json.loads(result.stdout)} == {
        "bn": 3, "gn": 1,
    }  # fmt: skip
    alone = cli("eval", mixed / "gn_empty.safetensors", "--group-by", "norm")
    assert alone.exit_code == 2 and "no finished epoch in any run" in alone.stderr


# --- outputs ---------------------------------------------------------------------------------


def test_markdown_cells_escape_pipes_and_line_breaks() -> None:
    table = to_markdown(["run", "acc"], [["a|b", "1\n2"]])
    assert table.splitlines() == ["| run | acc |", "| --- | --- |", "| a\\|b | 1 2 |"]


def test_eval_markdown_and_csv_of_checkpoints(cli, tiny_data: Path, mixed: Path) -> None:
    piped = mixed / "a|b.safetensors"
    (mixed / "bn_s1.safetensors").rename(piped)
    md = cli("eval", piped, mixed / "gn_s1.safetensors", "--data-dir", tiny_data, "--markdown")
    assert md.exit_code == 0, md.stderr
    header, _, row, _ = md.stdout.splitlines()
    assert row.startswith("| a\\|b |")
    assert row.replace("\\|", "").count("|") == header.count("|")

    args = ("eval", piped, mixed / "gn_s1.safetensors", "--data-dir", tiny_data)
    table = list(csv.DictReader(io.StringIO(cli(*args, "--csv").stdout)))
    reports = json.loads(cli(*args, "--json").stdout)
    assert [r["run"] for r in table] == ["a|b", "gn_s1"]
    for row, report in zip(table, reports, strict=True):
        assert float(row["eval_accuracy"]) == pytest.approx(report["metrics"]["accuracy"])
        assert int(row["wrong"]) == report["metrics"]["wrong"]
        assert float(row["final_accuracy"]) == report["final_accuracy"]


# --- plots -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--x", "norm", "--metric", "test_loss"), "--metric draws training curves"),
        (("--hue", "norm"), "--hue is for a study plot: give --x too"),
        (("--y", "test_error"), "--y is for a study plot: give --x too"),
        (("--x", "norm", "--hue", "norm"), "group key norm is given twice"),
        (("--x", "norm", "--y", "val_accuracy"), "no run records val_accuracy"),
        (("--x", "norm", "--y", "norm"), "unknown metric norm; available: test_accuracy"),
    ],
)
def test_bad_plot_requests_are_one_line(cli, mixed: Path, args: tuple, line: str) -> None:
    result = cli("plot", mixed, *args, "--out", mixed / "x.png")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], result.stderr
    assert not (mixed / "x.png").exists()


def test_study_plot_draws_a_line_per_split_and_names_runs_without_the_metric(
    cli, mixed: Path, tiny_checkpoints: dict[str, Path], captured_figures: list
) -> None:
    out = mixed / "s.png"
    result = cli("plot", mixed, "--x", "norm", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "differ in epochs (1, 2)" in result.stderr
    axes = captured_figures[-1].axes[0]
    bars = {c.get_label(): list(c.lines[0].get_ydata()) for c in axes.containers}
    assert bars == {"epochs=1": [12.0], "epochs=2": [pytest.approx(93.0), 80.0]}

    with_val = history(50.0, 96.0)
    with_val[-1].update(val_loss=0.4, val_accuracy=91.0)
    variant(tiny_checkpoints["bn_l1"], mixed / "bn_val.safetensors", with_val, epochs=2, val=20)
    result = cli("plot", mixed, "--x", "norm", "--y", "val_accuracy", "--where", "epochs=2",
                 "--out", out, "--overwrite")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert ("val_accuracy is not recorded by bn_s1.safetensors, bn_s2.safetensors, "
            "bn_s3.safetensors (+1 more) (trained without a validation split)") in result.stderr
    axes = captured_figures[-1].axes[0]
    assert [c.get_label() for c in axes.containers] == ["val=0", "val=20"]


def test_study_plot_of_an_option_that_is_not_always_a_number() -> None:
    runs = [{"limit": limit, "seed": s, "test_error": e}
            for limit, s, e in ((None, 1, 2.0), (None, 2, 4.0), (500, 1, 9.0))]  # fmt: skip
    rows = aggregate(runs, ["limit"], ["test_error"])
    ax = study_figure(rows, runs, "limit", "test_error").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "500"]
    assert list(ax.containers[0].lines[0].get_ydata()) == [3.0, 9.0]


def test_huge_finite_values_are_drawn_around_and_counted() -> None:
    big = history(10.0, 20.0, 30.0)
    big[0]["train_loss"] = 1e308
    big[1]["test_loss"] = -1.7e308
    fig = curves_figure([("run", big)], ["train_loss", "test_loss", "test_accuracy"])
    fig.savefig(io.BytesIO(), format="png")  # matplotlib's limits overflowed here
    notes = [[t.get_text() for t in ax.texts] for ax in fig.axes[:2]]
    assert notes == [["1 value(s) beyond ±1e+300 left out"]] * 2
    runs = [{"norm": "bn", "seed": s, "test_loss": v} for s, v in ((1, 1e308), (2, 1.7e308))]
    rows = aggregate(runs, ["norm"], ["test_loss"])
    assert rows[0]["test_loss"]["mean"] == pytest.approx(1.35e308)
    assert rows[0]["test_loss"]["std"] == pytest.approx(statistics.stdev([1.0, 1.7]) * 1e308)
    study_figure(rows, runs, "norm", "test_loss").savefig(io.BytesIO(), format="png")
