"""Failures and interruptions of the workers of a run: one line, not one per process.

`worker_errors` wraps the work of a process a launcher started: a failure is recorded in
torchelastic's error file (one JSON record: the line, the exit code, what kind of failure),
printed by rank 0 under torchrun, or read back with `read_records` and reported once by
normcli.parallel.launch under `normcli train --nproc`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from normcli.errors import NormcliError
from normcli.parallel.group import is_main_process, launched, rank
from normcli.runtime import INTERRUPTED, STOP_SIGNALS

# Set by `launch` for its workers: they record a failure for it and print nothing themselves.
LAUNCHER_ENV = "NORMCLI_LAUNCHER"

_interrupted = False


def was_interrupted() -> bool:
    """Whether this worker was asked to stop (SIGINT or SIGTERM) inside `worker_errors`."""
    return _interrupted


def _stop(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM in a worker: stop as Ctrl-C does, once; the launcher may send both."""
    global _interrupted
    _interrupted = True
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def worker_errors() -> Iterator[None]:
    """Around the work of a process started by a launcher (nothing otherwise).

    SIGTERM, as the launcher sends it to stop the others when one process fails, interrupts
    like Ctrl-C; once the work has failed, both are ignored. A failure is recorded in
    torchelastic's error file (TORCHELASTIC_ERROR_FILE), where the launcher finds it. Rank 0
    then raises it as usual, to be reported; the other processes exit with its exit code and
    print nothing, and so does rank 0 under `launch`, which reports one line for all of them."""
    if not launched():
        yield
        return
    handlers = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        # A failed worker is on its way out. The launcher's signal to stop every worker may
        # still reach it: while it records its failure (an interrupt there would be a second
        # error line), or as late as the interpreter's shutdown (a traceback from torch's
        # finalizers). From here on the signals are ignored.
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)
        handlers.clear()
        code = _record_failure(e)
        if is_main_process() and LAUNCHER_ENV not in os.environ:
            raise
        raise SystemExit(code) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# What a collective raises when another process has gone (gloo's words; nccl's are DistErrors).
_PEER_GONE = re.compile(r"(reset|closed) by peer|Broken pipe|Connection refused|Socket closed")


def _record_failure(error: BaseException) -> int:
    """Write `error` to the launcher's error file as one line; returns the exit code.

    The record says what kind of failure it is, for the launcher to report the cause rather
    than its consequences: "user" (a NormcliError: the run cannot go on as described),
    "internal" (a bug, or a crash), "secondary" (an interruption, or a collective broken by
    another process's end)."""
    if isinstance(error, NormcliError):
        code, message, kind = error.exit_code, str(error), "user"
    elif isinstance(error, KeyboardInterrupt):
        code, message, kind = INTERRUPTED, "interrupted", "secondary"
    elif isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
        message, kind = f"exit {error.code}", "internal"
    else:
        code, kind = 1, "internal"
        message = f"internal error: {type(error).__name__}: {error}"
    message = (message.strip().splitlines() or [type(error).__name__])[0]
    gone = isinstance(error, dist.DistError) or bool(_PEER_GONE.search(str(error)))
    if _interrupted or code == INTERRUPTED or (kind == "internal" and gone):
        kind = "secondary"
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {
            "message": message,  # what torchrun shows as the failure
            "timestamp": int(time.time()),
            "normcli": {"rank": rank(), "exit_code": code, "kind": kind},
        }
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(record))
        except OSError:
            pass  # the launcher then reports the exit code alone
    return code


def read_records(logs: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """The failures the workers recorded (see `_record_failure`) under the folder LOGS, by rank."""
    found = {}
    for path in Path(logs).rglob("error.json"):
        try:
            doc = json.loads(path.read_text())
            info = doc["normcli"]
            found[int(info["rank"])] = {"message": str(doc["message"]), **info}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours: reported by exit code
    return found
