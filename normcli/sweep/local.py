"""Ray around a sweep without Ray in the user's way: its output kept off stderr, normcli's
signal handlers kept, and a private Ray on this machine that leaves nothing behind.

- Ray's Python logger is silenced for the session (unless `verbose`, the CLI's --debug): its
  notices are about Ray, and the sweep reports every outcome itself.
- ray.init replaces the SIGTERM handler (with one that calls sys.exit(15)): it is put back
  right after ray.init; Ray's C++ failure handler, which prints a stack dump for SIGTERM, is
  not installed ($RAY_DISABLE_FAILURE_SIGNAL_HANDLER). So SIGTERM stops a sweep as it stops
  every command (normcli.runtime).
- A private Ray keeps its session folder in a temporary folder of its own, removed when the
  sweep ends, instead of piling up sessions in /tmp/ray; a reaper process (normcli.sweep.reaper)
  kills what is left of it and removes the folder if the driver is killed (SIGKILL, OOM).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError, one_line
from normcli.runtime import STOP_SIGNALS, terminated_elsewhere
from normcli.sweep.reaper import MARKER

# Small but comfortable for checkpoints of small CNNs; the default (30% of RAM) is far more
# than a sweep of tiny runs needs and would crowd a 24 GiB machine.
OBJECT_STORE_BYTES = 160 * 1024**2
NO_DUMP = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
_REAPER = Path(__file__).with_name("reaper.py")


@contextlib.contextmanager
def ray_logging(verbose: bool) -> Iterator[int]:
    """Ray's Python logger at INFO if `verbose`, else off, for the block; yields the level to
    give ray.init. Set before ray.init too: its first warnings come before it applies it."""
    logger = logging.getLogger("ray")
    before = logger.level
    level = logging.INFO if verbose else logging.CRITICAL + 1
    logger.setLevel(level)
    try:
        yield level
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Around ray.init: put SIGINT's and SIGTERM's handlers back afterwards (see the module
    docstring); a SIGTERM that Ray's handler turned into sys.exit(15) meanwhile becomes the
    interrupt normcli's handler raises."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers belong to the main thread
        return
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        raise terminated_elsewhere() from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:  # None: not installed from Python; nothing to put back
                signal.signal(sig, handler)


def ray_temp_root() -> str:
    """Where Ray keeps its session folders by default: $RAY_TMPDIR, else $TMPDIR on Linux, else
    /tmp (short: Ray's socket paths there must fit in 107 bytes)."""
    if os.environ.get("RAY_TMPDIR"):
        return os.environ["RAY_TMPDIR"]
    if sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


@contextlib.contextmanager
def local_ray(ray: Any, num_cpus: int, *, level: int, verbose: bool) -> Iterator[None]:
    """Start a private Ray with `num_cpus` CPUs in a temporary folder of its own; stop it and
    remove the folder when the block ends (the reaper does both if this process is killed)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    folder = tempfile.mkdtemp(prefix="normcli-ray-", dir=ray_temp_root())
    reaper = _start_reaper(folder)
    try:
        # Ray runs its workers at niceness 15, so a sweep's trainings would starve beside any
        # other work on the machine; they are this command's work: the driver's niceness.
        workers = {MARKER: folder, "RAY_worker_niceness": str(os.nice(0))}
        with kept_signal_handlers(), ray_environment(**workers):
            _init(ray, num_cpus, folder, level, verbose)
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
        _stop_reaper(reaper)


def _init(ray: Any, num_cpus: int, folder: str, level: int, verbose: bool) -> None:
    """ray.init of the private Ray, its failure as one NormcliError."""
    try:
        # "local" and not None: None would join whatever RAY_ADDRESS or /tmp/ray points at.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=verbose,  # workers' prints would tear through the progress bar
            object_store_memory=OBJECT_STORE_BYTES,
            logging_level=level,
            _temp_dir=folder,
        )
    except Exception as exc:
        raise NormcliError(f"could not start Ray on this machine: {one_line(exc)}") from None


@contextlib.contextmanager
def ray_environment(**values: str) -> Iterator[None]:
    """`values` in the environment while ray.init runs, for it and every process it starts:
    always NO_DUMP=1 (Ray's C++ failure handler would print a stack dump for a SIGTERM)."""
    values = {NO_DUMP: "1", **values}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_reaper(folder: str) -> subprocess.Popen | None:
    """The reaper of `folder`'s Ray, or None where /proc cannot tell which processes are its."""
    if not os.path.exists("/proc/self/environ"):
        return None
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", str(_REAPER), folder],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the sweep must not reach it
        )  # fmt: skip
    except OSError:  # no reaper costs only the clean-up after a SIGKILL
        return None


def _stop_reaper(reaper: subprocess.Popen | None) -> None:
    """Let the reaper finish: it kills any straggler of the stopped Ray and exits."""
    if reaper is None:
        return
    with contextlib.suppress(OSError):
        reaper.stdin.close()  # type: ignore[union-attr]
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(timeout=10)
