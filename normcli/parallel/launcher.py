"""The local launcher behind `normcli train --nproc`: torchrun's elastic agent, in this process.

The agent starts the workers with a rendezvous on a free port of 127.0.0.1 and tells each its
RANK, LOCAL_RANK and WORLD_SIZE; a failure of any of them comes back as one NormcliError,
chosen from the records the workers left (normcli.parallel.failures).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from normcli.errors import NormcliError
from normcli.parallel.failures import LAUNCHER_ENV, read_records
from normcli.runtime import INTERRUPTED


def launch(args: Sequence[str], nproc: int, *, threads: int) -> None:
    """Run `python -m normcli ARGS` as `nproc` processes on this machine under PyTorch's
    elastic agent (what torchrun runs) and wait for them.

    The rendezvous is a c10d store on a free port of 127.0.0.1 (two runs at once do not
    collide); each worker gets OMP_NUM_THREADS=`threads`. The workers print their output (rank
    0's progress and result) directly; a failure of any of them becomes one NormcliError: the
    first worker's own error line, or which worker died of what."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise NormcliError(f"nproc must be a positive number of processes, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="normcli-workers-") as logs, _launch_env(threads):
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"normcli-{uuid.uuid4().hex}",
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # port 0: the agent's store takes a free one
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "normcli", *args)
        except ChildFailedError as e:
            raise _failure_line(e.failures, read_records(logs)) from None
        except SignalException as e:  # Ctrl-C or SIGTERM to this process: the agent stopped all
            raise _interrupted(e.sigval, read_records(logs).get(0)) from None


@contextmanager
def _launch_env(threads: int) -> Iterator[None]:
    """The environment the agent hands its workers, and a quiet agent; restored afterwards.

    The agent installs its own SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers (to stop the workers):
    they are put back too, for callers that go on."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", LAUNCHER_ENV,
                                             "TORCHELASTIC_SIGNALS_TO_HANDLE")}  # fmt: skip
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    signals = [getattr(signal, name) for name in names if hasattr(signal, name)]
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    # The agent logs its progress (rendezvous, worker exits) at INFO to ERROR: the user's
    # output is the workers' own, and failures come back as one line.
    loggers = [
        logging.getLogger(name)
        for name in ("torch.distributed.elastic", "torch.distributed.launcher",
                     *logging.root.manager.loggerDict)  # fmt: skip
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))
    ]
    levels = {log: log.level for log in loggers}
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ[LAUNCHER_ENV] = "1"
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        for log, level in levels.items():
            log.setLevel(level)


def _interrupted(sig: int, main: dict[str, Any] | None) -> NormcliError:
    """The launcher stopped by signal `sig` (its agent stopped the workers): rank 0's own
    interruption line (what it saved) if it left one; exit code 128 + `sig`, as a shell reports
    a process ended by that signal (130 for SIGINT, 143 for SIGTERM)."""
    if main and main["exit_code"] == INTERRUPTED:
        message = main["message"]
    elif sig == signal.SIGINT:
        message = "interrupted"
    else:
        message = f"interrupted ({signal.Signals(sig).name})"
    return NormcliError(message, exit_code=128 + int(sig))


def _failure_line(failures: dict[int, Any], records: dict[int, dict[str, Any]]) -> Exception:
    """One NormcliError for the workers that failed (`failures`: rank -> ProcessFailure, as
    the agent saw them when it stopped the rest), the likeliest cause first: the lowest rank's
    NormcliError; else a process that died without a word (killed by a signal, crashed);
    else an internal error; else rank 0's (or the first) record."""

    def recorded(kind: str) -> list[int]:
        return sorted(r for r in failures if r in records and records[r]["kind"] == kind)

    if recorded("user"):
        rec = records[recorded("user")[0]]
        return NormcliError(rec["message"], exit_code=rec["exit_code"])
    silent = sorted(r for r in failures if r not in records)
    if silent:
        rank, failure = silent[0], failures[silent[0]]
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        message = f"worker process {rank} (pid {failure.pid}) {how}; all processes stopped"
        main = records.get(0)
        if main and main["message"].startswith("interrupted; "):  # what rank 0 had saved
            message += "; " + main["message"].removeprefix("interrupted; ")
        return NormcliError(message, exit_code=1)
    if recorded("internal"):
        rec = records[recorded("internal")[0]]
        return NormcliError(rec["message"], exit_code=rec["exit_code"])
    rec = records.get(0) or records[min(failures)]
    return NormcliError(rec["message"], exit_code=rec["exit_code"])
