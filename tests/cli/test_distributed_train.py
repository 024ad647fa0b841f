"""Data-parallel training: 2 processes (gloo, CPU) against one, and `normcli train --nproc`.

Starting processes dominates the cost, so they are few. One spawn of two ranks trains every
equality case (the single-process references are computed here) and, through `train`, the
uninterrupted reference of the command-line run. The command-line runs start together in one
module fixture: one interrupted with Ctrl-C (then resumed), one whose rank 1 is killed, and
two torchrun agents acting as two nodes; they overlap, which also shows that runs started at
the same time on one machine do not collide.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import save_file
from torch import nn

import normcli
from normcli import parallel
from normcli.checkpoint import load_checkpoint, read_file, read_metadata, save_checkpoint
from normcli.config import RunSpec
from normcli.data import Part, batches, get_dataset, synthetic_split, write_synthetic
from normcli.errors import NormcliError
from normcli.run import checkpoint_meta, new_run
from normcli.train import train, train_epoch

WORLD = 2
IMAGES, BATCH = 69, 16  # 5 steps; the last batch of 5 splits 3 + 2 (unequal shares)
# name -> (run options, reference): "same" is the same spec in one process, "ghost" one
# process whose BatchNorm normalizes each half of a batch on its own. L1 at the study's 1e-4:
# at 1e-3, weights held near zero flip sign on float-order differences of the all-reduce and
# the two trajectories parted by 2e-3 in 5 steps; a doubled L1 at 1e-4 still fails the check.
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "gn": ({"norm": "gn"}, "same"),
    "ln_l1_wd": ({"norm": "ln", "l1": 1e-4, "weight_decay": 1e-2}, "same"),
    "none": ({"norm": "none"}, "same"),
    "bn_sync": ({"norm": "bn", "sync_bn": True}, "same"),
    "bn_sync_contiguous": ({"norm": "bn", "sync_bn": True, "channels_last": False}, "same"),
    "bn": ({"norm": "bn"}, "ghost"),
}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
TIMING_KEYS = {"seconds", "images_per_second"}


def splits() -> tuple[Any, Any]:
    mnist = get_dataset("mnist")
    return synthetic_split(mnist, IMAGES, seed=5), synthetic_split(mnist, 8, seed=6)


def spec_of(options: dict[str, Any], world_size: int) -> RunSpec:
    # float32: bfloat16 rounds a share of a batch otherwise than the whole batch, beyond the
    # tolerance of "the same weights up to float rounding".
    return RunSpec.from_options(
        dataset="mnist", batch_size=BATCH, epochs=1, threads=1, world_size=world_size,
        precision="fp32", **options,
    ).resolve()  # augmentation on: its draws are made per global batch and sliced


def rank_main(rank: int, init_method: str, folder: str, data: str) -> None:
    """One rank: train every case for one epoch, save its weights and buffers; then the
    reference of the command-line run, with `train` as the workers of --nproc run it."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        # RANK is not set here: the answer comes from the group this process joined.
        assert (parallel.rank(), parallel.is_main_process()) == (rank, rank == 0)
        train_split, test_split = splits()
        states, layouts = {}, {}
        for name, (options, _) in CASES.items():
            run = new_run(spec_of(options, WORLD), train_split, test_split, torch.device("cpu"))
            with layouts_seen(run.model) as seen:
                train_epoch(run)
            layouts[name] = {"seen": sorted(seen),
                             "recorded": checkpoint_meta(run).train_args.channels_last}  # fmt: skip
            parallel.average_running_stats(run.model)  # as run_epoch does before evaluating
            states[name] = {k: v.clone() for k, v in run.model.state_dict().items()}
        torch.save(states, Path(folder) / f"rank{rank}.pt")
        (Path(folder) / f"layouts{rank}.json").write_text(json.dumps(layouts))
        spec = RunSpec.from_options(**CLI_RUN, world_size=WORLD)
        train(spec, data_dir=data, device="cpu", out=Path(folder) / "reference.safetensors")
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def layouts_seen(model: nn.Module) -> Iterator[set[bool]]:
    """The memory layouts (True: channels_last) of the inputs of every convolution while the
    block runs; a tensor that is both (one channel, or 1x1 images) says nothing."""
    seen: set[bool] = set()

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        last, plain = x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()
        if last != plain:
            seen.add(last)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, nn.Conv2d)]  # fmt: skip
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalizes each share of a batch (torch.tensor_split into WORLD) with
    its own statistics, and moves its running statistics by the mean of the shares' updates:
    what BatchNorm without --sync-bn computes in WORLD processes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        outs, means, variances = [], [], []
        for share in x.tensor_split(WORLD):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(share, mean, var, self.weight, self.bias, True,
                                     self.momentum, self.eps))  # fmt: skip
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked += 1
        return torch.cat(outs)


def one_process(options: dict[str, Any], ghost: bool) -> dict[str, torch.Tensor]:
    """The weights and buffers after one epoch in one process at the same global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = splits()
        run = new_run(spec_of(options, 1), train, test, torch.device("cpu"))
        for module in run.model.modules():
            if ghost and type(module) is nn.BatchNorm2d:
                module.__class__ = GhostBatchNorm2d  # same parameters, buffers and optimizer
        train_epoch(run)
        return run.model.state_dict()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data of the command-line run: MNIST-shaped, 320 training images."""
    return write_synthetic("mnist", tmp_path_factory.mktemp("cli_data"), 320, 64)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory, cli_data: Path) -> Path:
    """The folder where the two ranks left what they trained."""
    folder = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(
        rank_main, args=(f"file://{folder / 'rendezvous'}", str(folder), str(cli_data)),
        nprocs=WORLD, join=False, start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not context.join(timeout=0.5):  # raises with a failing rank's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish in time")
    return folder


@pytest.fixture(scope="module")
def ranks(spawned: Path) -> list[dict[str, dict[str, torch.Tensor]]]:
    """What each of the two ranks trained, by case."""
    return [torch.load(spawned / f"rank{r}.pt") for r in range(WORLD)]


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **TOLERANCE, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_what_one_process_trains(ranks: list, name: str) -> None:
    """GN, LN (with L1 and weight decay, applied once), no norm and synchronized BN: the same
    weights and statistics as one process at the same global batch; BN without --sync-bn:
    those of one process normalizing each half of every batch on its own."""
    options, reference = CASES[name]
    for key, value in ranks[0][name].items():  # every rank holds the same model
        assert torch.equal(ranks[1][name][key], value), key
    assert_states_close(ranks[0][name], one_process(options, ghost=reference == "ghost"))


def test_the_checkpoint_records_the_layout_that_trained(spawned: Path) -> None:
    """Every case, synchronized BatchNorm on the CPU included, trains in the memory layout its
    checkpoint records (channels_last, or contiguous where asked or for gn)."""
    recorded = set()
    for rank in range(WORLD):
        layouts = json.loads((spawned / f"layouts{rank}.json").read_text())
        assert layouts.keys() == CASES.keys()
        for name, layout in layouts.items():
            assert layout["seen"] == [layout["recorded"]], (rank, name)
            recorded.add(layout["recorded"])
    assert recorded == {True, False}  # both layouts were checked


def test_bn_without_sync_differs_from_full_batch_bn(ranks: list) -> None:
    """The ghost-batch reference has teeth: plain BatchNorm over the whole batch is far off."""
    full = one_process({"norm": "bn"}, ghost=False)
    gaps = [(ranks[0]["bn"][k] - v).abs().max().item() for k, v in full.items()]
    assert max(gaps) > 1e-3


def test_shares_of_a_batch_are_the_batch() -> None:
    """Each process's rows of every batch, augmented, are its slice of the one-process batch."""
    mnist = get_dataset("mnist")
    split = synthetic_split(mnist, 23, seed=1)

    def stream(shard: tuple[int, int] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(3)
        return list(batches(split, mnist, 8, shuffle=True, augment=mnist.augment,
                            generator=gen, shard=shard))  # fmt: skip

    whole = stream(None)
    shares = [stream((r, 3)) for r in range(3)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[i][1] for s in shares]), y)
        torch.testing.assert_close(torch.cat([s[i][0] for s in shares]), x)
    assert [Part.of(7, r, 3)[:2] for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


# ---- refusals, before any process starts ---------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def launch(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr(parallel, "launch", launch)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "0"], "--nproc must be a positive number of processes, got 0"),
        (["--nproc", "2", "--batch-size", "15"], "--batch-size 15 is the global batch and must "
                                                  "divide by the 2 processes; try 16"),
        (["--nproc", "2", "--norm", "gn", "--sync-bn"], "--sync-bn applies to norms with batch "
                                                         "statistics (bn), not to gn"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_in_one_line(
    tiny_data: Path, tmp_path: Path, no_launch: None, args: list[str], message: str
) -> None:
    result = run_cli("train", "--data-dir", tiny_data, "--out", tmp_path / "x.safetensors", *args)
    assert result.exit_code == 2
    assert result.stderr == f"normcli: error: {message}\n"


def test_more_processes_than_gpus_are_refused(
    tiny_data: Path, tmp_path: Path, no_launch: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = run_cli("train", "--data-dir", tiny_data, "--out", tmp_path / "x.safetensors",
                     "--nproc", "2", "--device", "cuda")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == (
        "normcli: error: 2 processes on cuda need a GPU each; this machine has 1: "
        "use fewer processes or the cpu device\n"
    )


def test_which_process_this_is_comes_from_the_launcher_before_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (parallel.rank(), parallel.is_main_process(), parallel.launched()) == (0, True, False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (parallel.rank(), parallel.is_main_process(), parallel.run_size()) == (1, False, 2)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(NormcliError, match="^RANK is set but is not a number: 'one'$"):
        parallel.is_main_process()


def test_checkpoints_from_before_data_parallelism_still_load(tmp_path: Path) -> None:
    """Format-2 files written before world_size and sync_bn existed mean one process."""
    spec = spec_of({"norm": "gn"}, 1)
    train, test = splits()
    run = new_run(spec, train, test, torch.device("cpu"))
    path = save_checkpoint(tmp_path / "old.safetensors", run.model, checkpoint_meta(run))
    raw, tensors = read_file(path)
    train_args = json.loads(raw["train_args"])
    del train_args["world_size"], train_args["sync_bn"]
    save_file(tensors, str(path), metadata={**raw, "train_args": json.dumps(train_args)})
    meta = read_metadata(path)
    assert meta.train_args == run.spec.train and meta.format_version == 2
    assert meta.label == "GN (G=4) + WS"


# ---- the command line: torchrun's launcher, interruption, resume, failure, two nodes -------


def env() -> dict[str, str]:
    environ = dict(os.environ, PYTHONPATH=str(Path(normcli.__file__).resolve().parents[1]))
    environ.pop("NORMCLI_DATA", None)
    return environ


def start(args: list[str], *, module: str = "normcli") -> subprocess.Popen[str]:
    # A session of its own: Ctrl-C reaches a terminal's whole foreground process group.
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


# The command-line run: 4 epochs of 320 images at global batch 16, one thread per process.
CLI_RUN = {"dataset": "mnist", "epochs": 4, "batch_size": 16, "threads": 1}


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--dataset", "mnist", "--data-dir", str(data), "--epochs", "4",
            "--batch-size", "16", "--threads", "1", "--device", "cpu", "--out", str(out),
            "--nproc", "2"]  # fmt: skip


def workers(parent: int) -> dict[int, int]:
    """Rank -> pid of the worker processes the launcher `parent` started."""
    found = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"RANK="):
                found[int(entry[5:])] = int(child)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, cli_data: Path) -> dict[str, Any]:
    """The command-line runs, started together; what each printed and wrote."""
    folder = tmp_path_factory.mktemp("launched")
    data = cli_data
    tiny = write_synthetic("mnist", folder / "tiny", 64, 32)
    paths = {name: folder / f"{name}.safetensors" for name in ("int", "term", "kill", "nodes")}
    port = free_port()
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "-m", "normcli",
            "train", "--dataset", "mnist", "--data-dir", str(tiny), "--epochs", "1",
            "--batch-size", "16", "--threads", "1", "--device", "cpu",
            "--out", str(paths["nodes"])]  # fmt: skip
    procs = {
        "int": start(train_args(data, paths["int"])),
        "term": start(train_args(data, paths["term"])),
        "kill": start(train_args(data, paths["kill"])),
        "node0": start(node, module="torch.distributed.run"),
        "node1": start(node, module="torch.distributed.run"),
    }
    # Once its first epoch is saved: Ctrl-C (the launcher and its workers) to one run, SIGTERM
    # to the launcher of another (as `kill PID` sends it), SIGKILL to rank 1 of the third.
    stop = {
        "int": lambda proc: os.killpg(proc.pid, signal.SIGINT),
        "term": lambda proc: os.kill(proc.pid, signal.SIGTERM),
        "kill": lambda proc: os.kill(workers(proc.pid)[1], signal.SIGKILL),
    }
    deadline = time.monotonic() + 240
    while stop:
        for name in [n for n in stop if paths[n].exists()]:
            stop.pop(name)(procs[name])
        for name in stop:
            if procs[name].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name}: no checkpoint: {finish(procs[name])[2]}")
        time.sleep(0.02)
    results = {"int": finish(procs.pop("int"))}
    saved = len(read_metadata(paths["int"]).history)
    resume = start(["train", "--resume", str(paths["int"]), "--data-dir", str(data),
                    "--nproc", "2"])  # fmt: skip
    results.update({name: finish(proc) for name, proc in procs.items()})
    return {"paths": paths, "data": data, "results": results, "saved": saved,
            "resumed": finish(resume)}  # fmt: skip


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


def test_sigterm_to_the_launcher_stops_every_rank_with_143(launched: dict[str, Any]) -> None:
    code, out, err = launched["results"]["term"]
    path = launched["paths"]["term"]
    assert code == 143, err
    assert out == "" and "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith("normcli: error: interrupted; ") and f"--resume {path} " in line
    assert 1 <= len(read_metadata(path).history) < 4  # saved epochs, resumable


def test_ctrl_c_stops_every_rank_once_and_resume_is_bit_exact(
    launched: dict[str, Any], spawned: Path
) -> None:
    code, out, err = launched["results"]["int"]
    path, data = launched["paths"]["int"], launched["data"]
    saved = launched["saved"]
    assert code == 130, err
    assert out == "" and "Traceback" not in err
    done = "epoch 1 of 4 is" if saved == 1 else f"epochs 1-{saved} of 4 are"
    assert error_lines(err) == [
        f"normcli: error: interrupted; {done} saved in {path}; "
        f"resume with: normcli train --resume {path} --data-dir {data} --nproc 2"
    ]
    assert 1 <= saved < 4, "Ctrl-C must land after epoch 1 is saved and before the end"

    code, out, err = launched["resumed"]
    assert code == 0, err
    assert out == f"{path}\n"  # rank 0 alone prints the path, and the progress
    assert err.count("epoch   4") == 1 and "Traceback" not in err
    reference = spawned / "reference.safetensors"  # the same run, uninterrupted, via train()
    _, resumed_tensors = read_file(path)
    _, reference_tensors = read_file(reference)
    assert resumed_tensors.keys() == reference_tensors.keys()
    assert "rng.torch.1" in resumed_tensors
    for key, value in reference_tensors.items():  # weights, BN statistics, momentum, RNG states
        assert torch.equal(resumed_tensors[key], value), key
    rows = [read_metadata(p).history for p in (path, reference)]
    strip = [[{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h] for h in rows]
    assert strip[0] == strip[1]


def test_the_checkpoint_records_the_processes_and_is_an_ordinary_model(
    launched: dict[str, Any],
) -> None:
    path, data = launched["paths"]["int"], launched["data"]
    assert launched["resumed"][0] == 0
    meta = read_metadata(path)
    assert (meta.train_args.world_size, meta.train_args.batch_size) == (2, 16)
    assert meta.train_args.per_process_batch == 8 and not meta.train_args.sync_bn
    assert meta.label == "BN [2 procs x 8]" and len(meta.history) == 4
    result = run_cli("eval", path, "--data-dir", data, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert (report["label"], report["world_size"], report["per_process_batch"]) == (
        "BN [2 procs x 8]", 2, 8
    )
    assert report["metrics"]["accuracy"] == pytest.approx(meta.history[-1]["test_accuracy"])
    refused = run_cli("train", "--resume", path, "--data-dir", data)
    assert refused.exit_code == 2
    assert error_lines(refused.stderr) == [
        f"normcli: error: {path}: trained by 2 processes, not 1; resume it with as many: "
        f"normcli train --resume {path} --nproc 2"
    ]


def test_a_killed_rank_ends_the_run_with_one_error_line(launched: dict[str, Any]) -> None:
    code, out, err = launched["results"]["kill"]
    assert code == 1
    assert out == "" and "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith("normcli: error: worker process 1 (pid ")
    assert "was killed by SIGKILL; all processes stopped" in line
    load_checkpoint(launched["paths"]["kill"])  # the last complete epoch is intact


def test_two_nodes_train_one_epoch(launched: dict[str, Any]) -> None:
    for name in ("node0", "node1"):
        code, _, err = launched["results"][name]
        assert code == 0, err
    outs = sorted(launched["results"][n][1] for n in ("node0", "node1"))
    assert outs == ["", f"{launched['paths']['nodes']}\n"]  # global rank 0 alone reports
    meta = read_metadata(launched["paths"]["nodes"])
    assert meta.train_args.world_size == 2 and len(meta.history) == 1


def test_library_refuses_a_world_size_without_its_processes() -> None:
    train, test = splits()
    with pytest.raises(NormcliError, match="world_size 2: this run has 1 process$"):
        new_run(spec_of({"norm": "gn"}, 2), train, test, torch.device("cpu"))
