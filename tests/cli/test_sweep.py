"""`normcli sweep` end to end on tiny data: grid refusals before Ray starts, four runs on an
embedded Ray with two workers, resuming after the driver died, a worker killed mid-run,
aggregation (`eval --group-by`) against an independent computation, study plots, `--val`."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from normcli.checkpoint import read_file, read_metadata
from normcli.config import RunSpec
from normcli.data import Split, load_split, write_synthetic
from normcli.errors import NormcliError
from normcli.plots import study_figure
from normcli.run import hold_out, new_run, save_run
from normcli.study import aggregate, checkpoint_records
from normcli.sweep import (
    MANIFEST_NAME,
    check_point_output,
    expand_grid,
    load_manifest,
    manifest_points,
    open_sweep,
    point_identity,
    run_points,
    train_point,
    update_point,
)
from normcli.train import run_epoch, train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TINY = ("--epochs", "2", "--batch-size", "50", "--device", "cpu")


pytestmark = pytest.mark.usefixtures("workers_import_the_tests")


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic("mnist", tmp_path_factory.mktemp("sweep_data"), n_train=200, n_test=100)


@pytest.fixture(scope="module")
def four_runs(sweep_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """bn, gn x seeds 1, 2 through the CLI: the command starts (and stops) its own Ray."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("sweeps") / "study"
    result = run_cli(
        "sweep", "--data-dir", sweep_data, "--norm", "bn,gn", "--seed", "1,2", *TINY,
        "--workers", "2", "--out", out,
    )  # fmt: skip
    return out, result


def _args(data: Path, out: Path, *grid: str) -> list[str | Path]:
    return ["sweep", "--data-dir", data, *grid, *TINY, "--workers", "2", "--out", out]


# --- refusals before Ray starts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        (("--norm", "gn", "--groups", "2,3"), "point groups-3: --groups 3 does not divide"),
        (("--seed", "1,2,1"), "--seed: value 1 is given twice"),
        (("--norm", "bn,batch"), "'batch' is not one of"),
        (("--lr", "0.1,fast"), "'fast' is not a valid float"),
        (("--lr", "0,0.1"), "point lr-0: --lr must be positive"),
        (("--augment", "maybe"), "not true or false"),
    ],
)
def test_invalid_points_are_refused_before_anything_runs(
    cli, sweep_data: Path, tmp_path: Path, grid: tuple[str, ...], expected: str
) -> None:
    out = tmp_path / "sweep"
    started = time.perf_counter()
    result = cli(*_args(sweep_data, out, *grid))
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not out.exists()  # nothing written
    assert time.perf_counter() - started < 10  # no Ray start-up


def test_without_ray_sweep_says_how_to_install_it(
    cli, sweep_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    result = cli(*_args(sweep_data, tmp_path / "s", "--seed", "1,2"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "normcli: error: sweep needs Ray: pip install 'normcli[ray]'"
    ]
    assert not (tmp_path / "s").exists()


def test_options_that_cannot_be_swept_are_refused(cli, sweep_data: Path, tmp_path: Path) -> None:
    result = cli(*_args(sweep_data, tmp_path / "s", "--resume", "x.safetensors"))
    assert result.exit_code == 2 and "--resume" in result.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MANY = ",".join(str(n) for n in range(1, 1001))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--workers", "0"), "--workers must be a whole number >= 1, not 0"),
        (("--workers", "1000000"), "--workers 1000000 runs at once need 1000000 CPUs (1 per run)"),
        (("--retries", "-1"), "--retries must be a whole number >= 0, not -1"),
        (("--gpus-per-run", "nan"), "--gpus-per-run must be a number >= 0, not nan"),
        (("--cpus-per-run", "0"), "--cpus-per-run must be a whole number >= 1, not 0"),
        (("--address", "nowhere"), "Ray address 'nowhere' is not HOST:PORT or 'auto'"),
        (("--address", "127.0.0.1:{port}"), "no Ray cluster at 127.0.0.1:{port}"),
        (("--val", "200", "--limit", "200"), "--val 200 leaves no training images of the 200"),
        (("--threads", "1,2", "--cpus-per-run", "1"), "--threads 2 is more than"),
        (("--seed", _MANY, "--lr", _MANY), "the grid has 2,000,000 points"),
    ],
)
def test_engine_options_and_big_grids_are_refused_before_anything_is_written(
    cli, sweep_data: Path, tmp_path: Path, extra: tuple[str, ...], expected: str
) -> None:
    out = tmp_path / "new" / "sweep"
    port = str(_closed_port())
    extra = tuple(arg.replace("{port}", port) for arg in extra)
    started = time.perf_counter()
    result = cli("sweep", "--data-dir", sweep_data, "--seed", "1,2", "--norm", "bn,gn", *TINY,
                 *extra, "--out", out)  # fmt: skip
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected.replace("{port}", port) in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # not even the folder
    assert time.perf_counter() - started < 10  # no Ray start-up, no grid expanded


def test_an_out_that_is_a_file_is_refused(cli, sweep_data: Path, tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("mine")
    made = f"{file / 's'} cannot be made: {file} is not a folder"
    for out, line in ((file, f"{file} is not a folder"), (file / "s", made)):
        result = cli(*_args(sweep_data, out, "--seed", "1,2"))
        assert (result.exit_code, result.stderr) == (2, f"normcli: error: {line}\n")
    assert file.read_text() == "mine" and list(tmp_path.iterdir()) == [file]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_share_no_node_has_is_refused_before_the_manifest(
    cli, sweep_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    result = cli(*_args(sweep_data, out, "--seed", "1,2"), "--gpus-per-run", "1")
    assert result.exit_code == 2
    assert result.stderr.startswith("normcli: error: no Ray node has 1 CPUs and 1 GPUs")
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()  # the folder made for it went with the refusal


def test_threads_can_be_swept() -> None:
    from normcli.cli.sweep import sweep_grid

    swept, fixed, points = sweep_grid({"threads": "1,2", "norm": "gn", "seed": None}, 2)
    assert swept == {"threads": [1, 2]} and fixed == {"norm": "gn"}
    assert [(p.name, p.options["threads"]) for p in points] == [("threads-1", 1), ("threads-2", 2)]
    _, fixed, _ = sweep_grid({"seed": "1,2"}, 3)
    assert fixed == {"threads": 3}  # one value for every run: the CPUs each reserves


# --- four runs on an embedded Ray ---------------------------------------------------------------


def test_four_runs_give_four_ordinary_checkpoints_and_a_manifest(four_runs) -> None:
    out, result = four_runs
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == [f"norm-{n}_seed-{s}.safetensors" for n in ("bn", "gn") for s in (1, 2)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p["status"] for p in manifest["points"]} == {"done"}
    assert manifest["swept"] == {"norm": ["bn", "gn"], "seed": [1, 2]}
    for path in out.glob("*.safetensors"):
        meta = read_metadata(path)
        assert len(meta.history) == 2 and meta.train_args.threads == 1
        assert f"norm-{meta.model_args.norm}_seed-{meta.train_args.seed}" == path.stem
    assert len([line for line in result.stderr.splitlines() if line.startswith("done")]) == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_run_in_a_sweep_equals_the_same_run_by_train(four_runs, sweep_data, tmp_path) -> None:
    out, _ = four_runs
    spec = RunSpec.from_options(norm="gn", seed=2, epochs=2, batch_size=50, threads=1)
    alone = tmp_path / "alone.safetensors"
    train(spec, data_dir=sweep_data, device="cpu", out=alone)
    _, swept = read_file(out / "norm-gn_seed-2.safetensors")
    _, single = read_file(alone)
    assert all(torch.equal(swept[k], v) for k, v in single.items() if k.startswith("model."))


def test_group_by_matches_an_independent_computation(four_runs, cli) -> None:
    out, _ = four_runs
    result = cli("eval", out, "--group-by", "norm", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["norm"] for r in rows] == ["bn", "gn"]
    for row in rows:
        finals = [
            read_metadata(out / f"norm-{row['norm']}_seed-{s}.safetensors").history[-1]
            for s in (1, 2)
        ]
        accs = [f["test_accuracy"] for f in finals]
        stats = row["test_accuracy"]
        assert stats["n"] == 2
        assert stats["mean"] == pytest.approx(statistics.mean(accs))
        assert stats["std"] == pytest.approx(statistics.stdev(accs))
        assert (stats["min"], stats["max"]) == (min(accs), max(accs))
        assert row["test_loss"]["mean"] == pytest.approx(
            statistics.mean(f["test_loss"] for f in finals)
        )
    csv = cli("eval", out, "--group-by", "norm", "--csv").stdout.splitlines()
    assert csv[0].startswith("norm,n,test_accuracy_mean,test_accuracy_std")
    assert len(csv) == 3
    table = cli("eval", out, "--group-by", "norm,seed", "--markdown").stdout
    assert table.count("\n| bn |") == 2
    assert all("±" not in line for line in table.splitlines()[2:])  # one run per group: no std


def test_re_running_after_the_driver_died_resumes_and_keeps_finished_runs(
    four_runs, sweep_data: Path, cli
) -> None:
    out, _ = four_runs
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    victim = out / "norm-bn_seed-2.safetensors"
    # The driver died during this point: its manifest entry says running, and its file holds
    # epoch 1 of 2 (what the last save before the kill left).
    spec = RunSpec.from_options(norm="bn", seed=2, epochs=2, batch_size=50, threads=1).resolve()
    run = new_run(
        spec, load_split("mnist", True, sweep_data), load_split("mnist", False, sweep_data),
        torch.device("cpu"),
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep ran it
    try:
        run_epoch(run)
    finally:
        torch.set_num_threads(threads)
    save_run(run, victim)
    manifest = json.loads((out / "manifest.json").read_text())
    for point in manifest["points"]:
        if point["name"] == victim.stem:
            point["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))

    result = cli(*_args(sweep_data, out, "--norm", "bn,gn", "--seed", "1,2"))
    assert result.exit_code == 0, result.stderr
    assert "3 of 4 runs already done" in result.stderr
    after = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    for name, raw in before.items():
        if name != victim.name:
            assert after[name] == raw, name  # finished points were not retrained
    assert read_metadata(victim).history[-1]["epoch"] == 2
    # The resumed run ends where the uninterrupted one had ended (bit-exact, same threads).
    _, resumed = read_file(victim)
    uninterrupted = safetensors.torch.load(before[victim.name])
    _, other = read_file(out / "norm-bn_seed-1.safetensors")
    weights = [k for k in resumed if k.startswith("model.")]
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in weights)
    assert any(not torch.equal(other[k], resumed[k]) for k in weights)  # not trivially equal


def test_a_bigger_grid_needs_extend(four_runs, sweep_data: Path, cli) -> None:
    out, _ = four_runs
    refused = cli(*_args(sweep_data, out, "--norm", "bn,gn", "--seed", "1,2,3"))
    assert refused.exit_code == 2 and "--extend" in refused.stderr
    assert "seed-3" in refused.stderr


def test_a_re_run_verifies_every_file_before_trusting_the_manifest(
    four_runs, sweep_data: Path, cli
) -> None:
    out, _ = four_runs
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    deleted, truncated = out / "norm-gn_seed-1.safetensors", out / "norm-gn_seed-2.safetensors"
    deleted.unlink()
    truncated.write_bytes(before[truncated.name][:1000])
    # Options spelled out at their defaults name the same runs: the sweep resumes.
    grid = ("--norm", "bn,gn", "--seed", "1,2", "--momentum", "0.9", "--l1", "0")
    result = cli(*_args(sweep_data, out, *grid))
    assert result.exit_code == 0, result.stderr
    assert "2 of 4 runs already done" in result.stderr
    assert f"again   norm-gn_seed-1: was done, but {deleted} is missing" in result.stderr
    assert f"again   norm-gn_seed-2: was done, but {truncated}: not a" in result.stderr
    assert {line.split()[1] for line in result.stderr.splitlines() if line.startswith("done")} \
        == {"norm-gn_seed-1:", "norm-gn_seed-2:"}  # fmt: skip
    for name, raw in before.items():
        if name.startswith("norm-bn"):
            assert (out / name).read_bytes() == raw, name  # trusted, untouched
        else:  # trained again, to the same weights (same seed, one thread)
            old, new = safetensors.torch.load(raw), read_file(out / name)[1]
            assert all(torch.equal(new[k], v) for k, v in old.items() if k.startswith("model."))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p["status"] for p in manifest["points"]} == {"done"}


def test_a_checkpoint_of_another_run_is_refused_before_anything_is_written(
    cli, sweep_data: Path, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    foreign = out / "seed-1.safetensors"
    foreign.write_bytes(tiny_checkpoints["bn_l1"].read_bytes())
    result = cli(*_args(sweep_data, out, "--seed", "1,2"))
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"normcli: error: point seed-1: {foreign} holds another run (batch_size 32 there, 50 here"
    ), lines[0]
    assert "l1 0.0001 there, 0.0 here" in lines[0] and "move it away" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == [foreign.name]  # no manifest
    assert foreign.read_bytes() == tiny_checkpoints["bn_l1"].read_bytes()


# --- a folder it does not trust (no Ray needed) --------------------------------------------------


@pytest.fixture
def one_done(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> tuple[Path, dict]:
    """A sweep folder whose point seed-1 is done (a tiny gn checkpoint of 2 epochs) and whose
    point seed-2 is pending; and the options the two share."""
    options = read_metadata(tiny_checkpoints["gn"]).run.options()
    del options["seed"]
    folder = tmp_path / "sweep"
    manifest, _ = open_sweep(folder, {"seed": [1, 2]}, options, **TRUST)
    shutil.copy(tiny_checkpoints["gn"], folder / "seed-1.safetensors")
    update_point(folder, manifest, "seed-1", "done", attempts=1, result={"test_accuracy": 9.0})
    return folder, options


TRUST = {"identity": point_identity, "verify": check_point_output}


def _one_epoch(path: Path) -> None:
    """Cut the checkpoint's history to its first epoch (a run stopped after epoch 1)."""
    raw, tensors = read_file(path)
    raw = {**raw, "history": json.dumps(json.loads(raw["history"])[:1])}
    safetensors.torch.save_file(tensors, str(path), metadata=raw)


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (None, None),
        (lambda p: p.unlink(), "is missing"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), ": not a"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (_one_epoch, "holds 1 of 2 epochs"),
    ],
    ids=["intact", "deleted", "truncated", "emptied", "unfinished"],
)
def test_a_done_point_counts_only_with_its_finished_checkpoint(one_done, damage, error) -> None:
    folder, options = one_done
    if damage is not None:
        damage(folder / "seed-1.safetensors")
    before = (folder / MANIFEST_NAME).read_bytes()
    manifest, action = open_sweep(folder, {"seed": [1, 2]}, options, **TRUST)
    assert action == "resume"
    entry = manifest["points"][0]
    assert load_manifest(folder) == manifest
    if error is None:
        assert entry["status"] == "done" and entry["result"] == {"test_accuracy": 9.0}
        assert (folder / MANIFEST_NAME).read_bytes() == before  # nothing to write
    else:
        assert entry["status"] == "pending" and entry["result"] is None
        assert entry["error"].startswith(f"was done, but {folder / 'seed-1.safetensors'}")
        assert error in entry["error"]
        assert [p.name for p in manifest_points(manifest)] == ["seed-1", "seed-2"]


@pytest.mark.parametrize("point", ["seed-1", "seed-2"])  # done, pending
def test_a_checkpoint_of_another_run_is_refused_and_kept(
    one_done, tiny_checkpoints: dict[str, Path], point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, options = one_done
    other = folder / f"{point}.safetensors"
    shutil.copy(tiny_checkpoints["ln"], other)
    before = (folder / MANIFEST_NAME).read_bytes()
    expected = rf"{other} holds another run \(norm ln there, gn here; groups none there, 2 here"
    with pytest.raises(NormcliError, match=rf"^point {point}: {expected}"):
        open_sweep(folder, {"seed": [1, 2]}, options, **TRUST)
    assert (folder / MANIFEST_NAME).read_bytes() == before
    assert other.read_bytes() == tiny_checkpoints["ln"].read_bytes()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained over another run's checkpoint")

    monkeypatch.setattr("normcli.train.train", no_training)
    monkeypatch.setattr("normcli.train.resume_training", no_training)
    seed = {"seed": int(point[-1])}
    with pytest.raises(NormcliError, match=f"^{expected}"):
        train_point({**options, **seed}, str(other))


def test_the_task_replaces_a_file_that_is_not_a_checkpoint(one_done, tiny_data: Path) -> None:
    folder, options = one_done
    junk = folder / "seed-2.safetensors"
    junk.write_bytes(b"\x00" * 4096)
    result = train_point({**options, "seed": 2}, str(junk), data_dir=str(tiny_data))
    meta = read_metadata(junk)
    assert result["epochs"] == len(meta.history) == 2 and meta.train_args.seed == 2
    assert result["test_accuracy"] == meta.history[-1]["test_accuracy"]


def test_an_option_spelled_out_at_its_default_is_the_same_point(tmp_path: Path) -> None:
    swept = {"seed": [1, 2]}
    open_sweep(tmp_path, swept, {"epochs": 2}, **TRUST)
    defaults = {"epochs": 2, "momentum": 0.9, "l1": 0.0, "batch_size": 64, "dataset": "mnist"}
    assert open_sweep(tmp_path, swept, defaults, **TRUST)[1] == "resume"
    with pytest.raises(NormcliError, match=r"other fixed options: momentum \(unset there, 0.9"):
        open_sweep(tmp_path, swept, {"epochs": 2, "momentum": 0.9})  # options compared as given
    with pytest.raises(NormcliError, match=r"other fixed options: epochs \(2 there, 3 now\)"):
        open_sweep(tmp_path, swept, {"epochs": 3, "momentum": 0.9}, **TRUST)
    with pytest.raises(NormcliError, match=r"batch_size \(unset there, 32 now\)"):
        open_sweep(tmp_path, swept, {"epochs": 2, "batch_size": 32}, **TRUST)


# --- a worker killed mid-run -------------------------------------------------------------------


def dies_after_first_epoch(options: dict, output: str) -> dict:
    """Sweep task whose first attempt kills its own worker once epoch 1 is saved."""
    marker = Path(output).with_suffix(".died")
    if not marker.exists():

        def kill_when_saved() -> None:
            while not Path(output).exists():
                time.sleep(0.01)
            marker.touch()
            os._exit(1)  # like an OOM kill: no cleanup, no exception

        threading.Thread(target=kill_when_saved, daemon=True).start()
    return train_point(options, output, data_dir=options.pop("_data"))


def test_a_killed_worker_is_retried_and_resumes_to_the_same_weights(
    sweep_data: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    fixed = {"norm": "gn", "epochs": 3, "batch_size": 25, "threads": 1, "seed": 4}
    [point] = expand_grid({"seed": [4]}, {k: v for k, v in fixed.items() if k != "seed"})
    point.options["_data"] = str(sweep_data)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        outcomes = run_points([point], dies_after_first_epoch, folder=tmp_path, max_retries=2)
    finally:
        ray.shutdown()
    outcome = outcomes[point.name]
    assert outcome.status == "done", outcome.error
    assert (tmp_path / f"{point.name}.died").exists()  # the first attempt did die
    assert outcome.attempts == 2
    reference = tmp_path / "reference.safetensors"
    train(RunSpec.from_options(**fixed), data_dir=sweep_data, device="cpu", out=reference)
    _, resumed = read_file(tmp_path / f"{point.name}.safetensors")
    _, uninterrupted = read_file(reference)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


# --- study plots and aggregation ----------------------------------------------------------------


def test_study_plot_draws_means_with_std_error_bars_on_a_log2_axis() -> None:
    records = [
        {"norm": n, "batch_size": b, "seed": s, "test_error": e}
        for n, b, s, e in [("bn", 2, 1, 9.0), ("bn", 2, 2, 11.0), ("bn", 8, 1, 2.0),
                           ("bn", 8, 2, 4.0), ("gn", 2, 1, 3.0), ("gn", 8, 1, 3.5)]
    ]  # fmt: skip
    rows = aggregate(records, ["norm", "batch_size"], ["test_error"])
    fig = study_figure(rows, records, "batch_size", "test_error", "norm")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    data = {
        c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
        for c in ax.containers
    }
    assert data["norm=bn"] == ([2, 8], [10.0, 3.0])
    assert data["norm=gn"] == ([2, 8], [3.0, 3.5])
    bars = [c for c in ax.containers if c.get_label() == "norm=bn"][0]
    segments = bars.lines[2][0].get_segments()  # the vertical error bars
    spans = [(seg[0][1], seg[1][1]) for seg in segments]
    sd = statistics.stdev([9.0, 11.0])
    assert spans[0] == pytest.approx((10 - sd, 10 + sd))
    assert ax.get_xticks().tolist() == [2, 8]


def test_checkpoint_records_hold_every_option_and_the_final_metrics(four_runs) -> None:
    out, _ = four_runs
    records = checkpoint_records(sorted(out.glob("*.safetensors")))
    assert len(records) == 4
    for record in records:
        meta = read_metadata(record["path"])
        assert record["test_error"] == pytest.approx(100 - meta.history[-1]["test_accuracy"])
        assert record["batch_size"] == 50 and record["label"] == meta.label


# --- the validation split ------------------------------------------------------------------------


def test_hold_out_sizes_disjointness_and_determinism() -> None:
    n = 50
    split = Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n))
    train_a, val_a = hold_out(split, 12, seed=3)
    train_b, val_b = hold_out(split, 12, seed=3)
    _, val_c = hold_out(split, 12, seed=4)
    assert (len(train_a), len(val_a)) == (38, 12)
    assert set(train_a.labels.tolist()).isdisjoint(val_a.labels.tolist())
    assert sorted(train_a.labels.tolist() + val_a.labels.tolist()) == list(range(n))
    assert torch.equal(val_a.labels, val_b.labels) and torch.equal(train_a.labels, train_b.labels)
    assert not torch.equal(val_a.labels, val_c.labels)
    assert val_a.labels.tolist() == sorted(val_a.labels.tolist())  # original order kept
    assert hold_out(split, 0, seed=3) == (split, None)
    with pytest.raises(Exception, match="leaves no training images"):
        hold_out(split, 50, seed=3)


def test_train_with_val_records_validation_metrics(cli, sweep_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.safetensors"
    result = cli("train", "--data-dir", sweep_data, "--val", "40", *TINY, "--out", out)
    assert result.exit_code == 0, result.stderr
    meta = read_metadata(out)
    assert meta.train_args.val == 40
    for row in meta.history:
        assert 0 <= row["val_accuracy"] <= 100 and row["val_loss"] > 0
        assert row["images_per_second"] * row["seconds"] == pytest.approx(160)  # 200 - 40
    grouped = json.loads(cli("eval", out, "--group-by", "norm", "--json").stdout)
    assert grouped[0]["val_accuracy"]["mean"] == pytest.approx(meta.history[-1]["val_accuracy"])
