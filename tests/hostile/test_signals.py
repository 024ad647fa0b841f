"""SIGINT and SIGTERM in every command, and a sweep's driver killed outright: real processes
(`python -m normcli ...`), signalled once they are working.

Each command ends with exactly one line on stderr and exit code 130 (SIGINT) or 143 (SIGTERM);
a sweep also keeps its folder resumable, leaves no Ray session folder, and keeps Ray's own
output (warnings, colour codes, its C++ signal dump) off stderr. A sweep driver killed with
SIGKILL leaves no Ray process behind for long. `train --nproc`'s SIGTERM is tested with the
other launcher runs in test_distributed_train.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import normcli
from normcli.checkpoint import read_metadata

ROOT = Path(normcli.__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("NORMCLI_DATA", None)
    env.update(extra)
    return env


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def _wait_for(ready: object, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until `ready()` is true while `proc` runs; fail with its stderr if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"never got to work: {_finish(proc)[2]}")
        time.sleep(0.05)


# `python -m normcli ARGS` with normcli.checkpoint.find_checkpoints (the first step of eval,
# plot, history) replaced by one that says it started, then works for a minute.
_WORKING = """
import pathlib, runpy, sys, time
import normcli.checkpoint

def working(*args, **kwargs):
    pathlib.Path({ready!r}).touch()
    time.sleep(60)

normcli.checkpoint.find_checkpoints = working
sys.argv = ["normcli", *sys.argv[1:]]
runpy.run_module("normcli", run_name="__main__")
"""


@pytest.mark.parametrize(
    ("command", "sig", "code", "line"),
    [
        ("eval", signal.SIGINT, 130, "normcli: error: interrupted\n"),
        ("eval", signal.SIGTERM, 143, "normcli: error: interrupted (SIGTERM)\n"),
        ("plot", signal.SIGTERM, 143, "normcli: error: interrupted (SIGTERM)\n"),
    ],
)
def test_a_signal_while_a_command_works_is_one_line(command, sig, code, line, tmp_path) -> None:
    ready = tmp_path / "ready"
    script = _WORKING.format(ready=str(ready))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, command, str(tmp_path / "run.safetensors")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for(ready.exists, proc)
    proc.send_signal(sig)
    assert _finish(proc) == (code, "", line)


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short folder for Ray's session folder: its socket paths must fit in 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _sweep(data: Path, out: Path, ray_tmp: Path) -> subprocess.Popen[str]:
    """A sweep of two long tiny runs, its Ray's session folder under `ray_tmp`."""
    return subprocess.Popen(
        [sys.executable, "-m", "normcli", "sweep", "--data-dir", str(data), "--norm", "bn,gn",
         "--epochs", "200", "--batch-size", "20", "--device", "cpu", "--workers", "2",
         "--out", str(out)],
        env=_env(RAY_TMPDIR=str(ray_tmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _training(out: Path) -> bool:
    """Whether both points of the sweep in `out` have saved an epoch."""
    return len(list(out.glob("*.safetensors"))) == 2


def _ray_processes(ray_tmp: Path) -> list[int]:
    """Processes started with RAY_TMPDIR=ray_tmp: the sweep's driver and its Ray's."""
    needle = f"RAY_TMPDIR={ray_tmp}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_sigterm_stops_a_sweep_in_one_line_and_a_second_sweep_is_refused(
    cli, tiny_data: Path, tmp_path: Path, ray_tmp: Path
) -> None:
    out = tmp_path / "sweep"
    proc = _sweep(tiny_data, out, ray_tmp)
    try:
        _wait_for(lambda: _training(out), proc)
        # Meanwhile, the same sweep into the same folder stops at once, without starting Ray.
        started = time.monotonic()
        second = cli("sweep", "--data-dir", tiny_data, "--norm", "bn,gn", "--epochs", "200",
                     "--batch-size", "20", "--device", "cpu", "--out", out)  # fmt: skip
        assert time.monotonic() - started < 10
        assert second.exit_code == 2 and second.stdout == ""
        assert second.stderr == (
            f"normcli: error: {out / 'manifest.json'} is being written by another normcli "
            f"process (pid {proc.pid})\n"
        )
        proc.send_signal(signal.SIGTERM)
    finally:
        code, stdout, stderr = _finish(proc)
    assert (code, stdout) == (143, ""), stderr
    assert stderr == (
        f"normcli: error: interrupted; 0 of 2 runs are done in {out}; "
        "re-run the same command to go on\n"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["pending", "pending"]  # none failed
    # Each run's saved epochs are kept for the next attempt; no claim or temporary file is left.
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "norm-bn.safetensors", "norm-gn.safetensors"
    ]
    assert all(read_metadata(path).history for path in out.glob("*.safetensors"))
    assert list(ray_tmp.iterdir()) == []  # Ray's session folder went with it


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_killed_sweep_driver_leaves_no_ray_behind(
    tiny_data: Path, tmp_path: Path, ray_tmp: Path
) -> None:
    """Ray's own fate-sharing kills its GCS and raylet with the driver; its agents would wait a
    minute for the GCS. The reaper kills them and removes the session folder at once."""
    out = tmp_path / "sweep"
    proc = _sweep(tiny_data, out, ray_tmp)
    try:
        _wait_for(lambda: _training(out), proc)
        assert len(_ray_processes(ray_tmp)) > 3  # driver, GCS, raylet, agents, workers
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 45  # under load; Ray alone takes a minute or more
        while (_ray_processes(ray_tmp) or list(ray_tmp.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ray_processes(ray_tmp) == [] and list(ray_tmp.iterdir()) == []
    finally:
        for pid in _ray_processes(ray_tmp):  # whatever is left, for the next tests' sake
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
