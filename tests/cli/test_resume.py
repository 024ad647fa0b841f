"""Interruption and resume with a real `python -m normcli train` subprocess.

A run killed with SIGKILL mid-epoch and resumed with `normcli train --resume`
must end with the same weights, optimizer state and history as an uninterrupted
run with the same seed (on the CPU); Ctrl-C (SIGINT) must stop cleanly with exit
code 130, a valid checkpoint and a hint naming `--resume`.

Only the interrupted run is a subprocess (starting one costs seconds on a busy
machine); the reference run and the resume run in-process, like the subprocess
on one thread, so all three compute the same floats.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import normcli
from normcli.checkpoint import load_checkpoint, read_file, read_metadata
from normcli.data import write_synthetic
from normcli.errors import NormcliError

EPOCHS = 3
TIMING_KEYS = {"seconds", "images_per_second"}  # wall-clock numbers differ between runs


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST with enough training images that an epoch takes a noticeable fraction of a second."""
    return write_synthetic("mnist", tmp_path_factory.mktemp("resume_data"), n_train=600, n_test=100)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Match the subprocess (OMP_NUM_THREADS=1): other thread counts may sum in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    """The working tree's normcli, one thread (deterministic and fair on a busy machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(normcli.__file__).resolve().parents[1])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.pop("NORMCLI_DATA", None)
    return env


def _train_args(data: Path, out: Path) -> list[str]:
    """`normcli train ...` arguments: 3 epochs of about a second each on one thread."""
    return [
        "train", "--dataset", "mnist", "--data-dir", str(data), "--epochs", str(EPOCHS),
        "--batch-size", "16", "--seed", "3", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def _start(args: list[str]) -> subprocess.Popen[str]:
    """`python -m normcli ARGS` in a subprocess, as a user would run it."""
    return subprocess.Popen(
        [sys.executable, "-m", "normcli", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_epochs(proc: subprocess.Popen[str], ckpt: Path, epochs: int) -> int:
    """Poll the checkpoint until it holds at least `epochs` complete epochs; returns the count."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(
                f"training ended (exit {proc.returncode}) before it was interrupted:\n{err}"
            )
        try:
            done = len(read_metadata(ckpt).history)
        except NormcliError:  # not written yet
            done = 0
        if done >= epochs:
            return done
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the checkpoint never showed a complete epoch")


def _history(path: Path) -> list[dict[str, float]]:
    return [
        {k: v for k, v in row.items() if k not in TIMING_KEYS}
        for row in read_metadata(path).history
    ]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(
    resume_data: Path, tmp_path: Path, one_thread: None, cli
) -> None:
    reference_path = tmp_path / "reference.safetensors"
    killed_path = tmp_path / "killed.safetensors"
    victim = _start(_train_args(resume_data, killed_path))
    try:
        # The uninterrupted run, while the subprocess starts up.
        reference = cli(*_train_args(resume_data, reference_path))
        assert reference.exit_code == 0, reference.stderr
        _wait_for_epochs(victim, killed_path, 1)
        victim.send_signal(signal.SIGKILL)  # no handler, no cleanup: like a crash or an OOM kill
        victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    before = read_metadata(killed_path)
    saved = len(before.history)
    assert 1 <= saved < EPOCHS, "the kill must land after epoch 1 is saved and before the end"

    resumed = cli("train", "--resume", killed_path, "--data-dir", resume_data, "--device", "cpu")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout.strip() == str(killed_path)

    assert _history(killed_path) == _history(reference_path)
    assert len(_history(killed_path)) == EPOCHS
    _, resumed_tensors = read_file(killed_path)
    _, reference_tensors = read_file(reference_path)
    assert resumed_tensors.keys() == reference_tensors.keys()
    assert any(k.startswith("model.") for k in resumed_tensors)
    for key, value in reference_tensors.items():  # weights, BN statistics, momentum, RNG states
        assert torch.equal(resumed_tensors[key], value), key
    after = load_checkpoint(killed_path).meta  # and it is a valid model
    assert after.started == before.started < before.created < after.created  # the first start


def test_sigint_stops_cleanly_with_a_resume_hint(resume_data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.safetensors"
    proc = _start(_train_args(resume_data, ckpt))
    try:
        _wait_for_epochs(proc, ckpt, 1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("normcli: error:")]
    assert len(lines) == 1, err
    assert f"--resume {ckpt}" in lines[0]
    assert out == ""  # the path is printed only when training completes

    saved = load_checkpoint(ckpt)  # the last complete epoch is there, intact
    assert 1 <= len(saved.meta.history) < EPOCHS
    n = len(saved.meta.history)
    assert (f"epochs 1-{n} of {EPOCHS} are" if n > 1 else f"epoch 1 of {EPOCHS} is") in lines[0]
    assert saved.meta.resume is not None
    assert _leftovers(tmp_path) == []  # the interrupted atomic write left no temporary file


def test_resume_of_a_finished_run_changes_nothing(
    tiny_checkpoints: dict[str, Path], tiny_data: Path, cli
) -> None:
    ckpt = tiny_checkpoints["gn"]
    before = ckpt.read_bytes()
    result = cli("train", "--resume", ckpt, "--data-dir", tiny_data, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(ckpt)
    assert ckpt.read_bytes() == before


def test_ctrl_c_right_after_a_checkpoint_is_written_counts_that_epoch(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """Ctrl-C landing just after the file is renamed into place, before the run notes that the
    epoch is saved: the message must agree with the file (a race CI once hit, made certain)."""
    module = importlib.import_module("normcli.run")
    real_save = module.save_checkpoint
    calls = []

    def save_then_ctrl_c(*args, **kwargs):
        written = real_save(*args, **kwargs)
        calls.append(written)
        signal.raise_signal(signal.SIGINT)  # delivered here, or held until the write is booked
        return written

    monkeypatch.setattr(module, "save_checkpoint", save_then_ctrl_c)
    ckpt = tmp_path / "run.safetensors"
    result = cli("train", "--dataset", "mnist", "--data-dir", tiny_data, "--epochs", "3",
                 "--batch-size", "32", "--device", "cpu", "--out", ckpt)  # fmt: skip
    assert result.exit_code == 130, result.stderr
    assert len(calls) == 1 and len(read_metadata(ckpt).history) == 1
    assert result.stderr == (
        f"normcli: error: interrupted; epoch 1 of 3 is saved in {ckpt}; "
        f"resume with: normcli train --resume {ckpt} --data-dir {tiny_data}\n"
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
