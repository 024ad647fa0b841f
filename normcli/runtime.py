"""How a normcli process runs: exit codes, signals, the standard streams, threads (and
OpenMP's spin, per situation), device.

A leaf: it imports nothing from normcli but the error type, and torch only inside the
functions that need it, so that the entry point (normcli.entry) can set all of this up
before the CLI's imports (torch, typer: seconds) start.

- Ctrl-C (SIGINT) and SIGTERM (what `kill` and Slurm send) raise KeyboardInterrupt in the
  main thread, so the same cleanup runs for both (temporary files removed, training's
  resume hint); the exit code is INTERRUPTED (130) for SIGINT and TERMINATED (143) for
  SIGTERM, after one line on stderr, never a traceback, even during the imports. Once the
  command is over (its output written, its cleanup done), they end the process silently,
  as their default action does.
- stdout and stderr never fail on a character the locale cannot encode (a latin-1 or
  ASCII terminal): stderr escapes it, stdout writes '?' (paths that are not valid UTF-8
  keep their original bytes).
- stdout's write failures are raised as StdoutError: a closed stdout (`normcli ... >&-`)
  or a full one (`> /dev/full`) is one error line and exit code 1 (`cli.main`); a
  reader that goes away (`normcli ... | head -1`) ends the run quietly with exit code
  BROKEN_PIPE (141), as a shell tool killed by SIGPIPE would.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from normcli.errors import NormcliError

if TYPE_CHECKING:  # torch is imported where it is used: see the module docstring
    import torch

# Exit codes besides 0, 1 (an internal error, a failed write to stdout) and a NormcliError's
# own (normcli.errors.USAGE, 2, by default): 128 + the signal's number, as a shell reports it.
INTERRUPTED = 128 + signal.SIGINT  # 130
TERMINATED = 128 + signal.SIGTERM  # 143
BROKEN_PIPE = 128 + signal.SIGPIPE  # 141
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; `kill`, Slurm, a launcher
STDOUT_ERRORS = "normcli.stdout"
SPIN_COUNT = "1000"  # GOMP_SPINCOUNT of a packed run: see SPIN_SETTINGS


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that every Ctrl-C cleanup path runs for it too."""


_terminated = False


def interrupt_exit_code() -> int:
    """130 for Ctrl-C, 143 once SIGTERM has been received."""
    return TERMINATED if _terminated else INTERRUPTED


def interrupt_message() -> str:
    """The error line's text for an interrupt."""
    return "interrupted (SIGTERM)" if _terminated else "interrupted"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _terminated
    if _terminated:  # a second SIGTERM while cleaning up: let the cleanup finish
        return
    _terminated = True
    raise Terminated


def terminated_elsewhere() -> Terminated:
    """What to raise for a SIGTERM that another library's handler caught first (Ray's, while
    ray.init runs, calls sys.exit(15)): the interrupt our own handler would have raised."""
    global _terminated
    _terminated = True
    return Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises Terminated; SIGINT keeps Python's KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_on_signals() -> None:
    """From here on SIGINT and SIGTERM end the process at once, as their default action
    does (exit status 130 / 143 to a shell), with nothing printed: the command's work and
    cleanup are over, and an exception raised in the interpreter's shutdown (torch's
    finalizers) would only print a traceback. A signal that is ignored stays ignored."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


def _replace_keeping_bytes(error: UnicodeError) -> tuple[str | bytes, int]:
    """Encode errors on stdout: surrogate-escaped bytes (from file names) go out as they
    came in; any other character the encoding lacks becomes '?'."""
    if isinstance(error, UnicodeEncodeError):
        bad = error.object[error.start : error.end]
        if all(0xDC80 <= ord(c) <= 0xDCFF for c in bad):
            return codecs.lookup_error("surrogateescape")(error)
        return codecs.lookup_error("replace")(error)
    raise error


class StdoutError(Exception):
    """Writing to stdout failed (closed, full, reader gone); `error` says how.

    Not an OSError, so that nothing on the way up (Click handles EPIPE its own way)
    mistakes it for a problem with the command's own files.
    """

    def __init__(self, error: OSError | ValueError) -> None:
        super().__init__(str(error))
        self.error = error


class GuardedStdout(io.TextIOBase):
    """stdout, with its write failures raised as StdoutError."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError) as e:
            raise StdoutError(e) from e

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError) as e:
            raise StdoutError(e) from e

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.stream.errors

    @property
    def buffer(self) -> io.BufferedIOBase:  # type: ignore[override]
        return self.stream.buffer  # type: ignore[attr-defined]

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the interpreter closes the real stream; never flush from __del__
        pass


class ClosedStream(io.TextIOBase):
    """Stands for a standard stream that was closed when the process started."""

    encoding = "utf-8"  # type: ignore[assignment]

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def flush(self) -> None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def close(self) -> None:  # never flush (and fail) from __del__
        pass


def configure_streams() -> None:
    """Make stdout and stderr safe to print anything to; see the module docstring."""
    codecs.register_error(STDOUT_ERRORS, _replace_keeping_bytes)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors=STDOUT_ERRORS)
    # Started with fd 1 closed, Python sets sys.stdout to None and print() drops everything.
    sys.stdout = GuardedStdout(sys.stdout if sys.stdout is not None else ClosedStream())
    if sys.stderr is None:  # nowhere to report to: keep quiet rather than fail
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    elif isinstance(sys.stderr, io.TextIOWrapper):
        sys.stderr.reconfigure(errors="backslashreplace")


def release_stdout() -> None:
    """After stdout failed, point fd 1 at /dev/null: the interpreter's own flush at exit
    would otherwise fail again and print 'Exception ignored' lines."""
    stream = getattr(sys.stdout, "stream", sys.stdout)
    if stream is None:
        return
    try:
        stream.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):  # ClosedStream: no descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        sys.stdout = None  # type: ignore[assignment]


# OpenMP's idle spin, per situation (measured: bench/results/threads_per_run.md,
# bench/results/precision.md). A lone run, one training with the machine's cores to itself,
# keeps libgomp's own default (GOMP_SPINCOUNT 300,000): its threads wake at once between the
# many small kernels of a small CNN; the short spin cost such a run 16% on an AMX Xeon. A
# packed run, several trainings sharing the cores, takes the short spin, SPIN_COUNT: long
# spinning starves the others (two 2-thread MNIST trainings on 2 cores: 71-157 img/s each
# against about 2,600). Packed means: the sweep command and its workers; `train --nproc N`
# (N > 1) and the processes a launcher started (WORLD_SIZE > 1); fewer threads than usable
# cores, from --threads or OMP_NUM_THREADS (others are expected to run beside). Whatever the
# user set (SPIN_SETTINGS) is left as it is.
SPIN_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _argv_option(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (the last one given), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.partition("=")[2]
    return value


def _count(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip().isdigit() else None


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def is_packed(argv: Sequence[str], environ: Mapping[str, str], cores: int) -> bool:
    """Whether the process (the command line `argv` after the program name) shares the cores
    with other trainings: see SPIN_SETTINGS's comment."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command == "sweep":  # its workers train side by side
        return True
    nproc = _count(_argv_option(argv, "--nproc"))
    if (nproc or 1) > 1 or (_count(environ.get("WORLD_SIZE")) or 1) > 1:
        return True
    threads = _count(_argv_option(argv, "--threads")) or _count(environ.get("OMP_NUM_THREADS"))
    return threads is not None and threads < cores


def spin_count(argv: Sequence[str], environ: Mapping[str, str], cores: int) -> str | None:
    """The GOMP_SPINCOUNT to set for this situation; None: leave the environment alone (a lone
    run keeps libgomp's default, and a user's own setting stays)."""
    if any(k in environ for k in SPIN_SETTINGS):
        return None
    return SPIN_COUNT if is_packed(argv, environ, cores) else None


def describe_spin(environ: Mapping[str, str]) -> str:
    """The spin policy `environ` gives OpenMP, in words (for reports)."""
    chosen = [f"{k}={environ[k]}" for k in SPIN_SETTINGS if environ.get(k)]
    return ", ".join(chosen) or "libgomp's default spin (GOMP_SPINCOUNT 300,000)"


def configure_threads(packed: bool | None = None) -> None:
    """Set OpenMP's idle spin for this process's situation (see SPIN_SETTINGS): the short
    spin, GOMP_SPINCOUNT=1000, for a packed run (several trainings sharing the cores),
    libgomp's default for a lone one; `packed` None: judged from sys.argv and the
    environment. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept.

    Must run before torch loads its OpenMP runtime (libgomp, what torch's Linux wheels use),
    which reads the setting once: hence in the entry point, before the CLI's imports, and
    not measured per run (bench/results/precision.md, bench/results/threads_per_run.md)."""
    if any(k in os.environ for k in SPIN_SETTINGS):
        return
    if packed is None:
        count = spin_count(sys.argv[1:], os.environ, usable_cores())
    else:
        count = SPIN_COUNT if packed else None
    if count is not None:
        os.environ["GOMP_SPINCOUNT"] = count


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers that
    were installed. Without it Ctrl-C landing between a checkpoint's rename and the
    bookkeeping after it reports the epoch as unsaved while the file holds it. Written by
    hand: neither the standard library nor torch offers it, and blocking the signals with
    pthread_sigmask would not do (the kernel hands them to another thread, such as
    OpenMP's, and Python still runs the handler in the main thread)."""
    installed = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in installed.values():
        yield  # handlers can only be swapped in the main thread, and restored if Python's
        return
    caught: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in installed.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            _deliver(signum, installed[signum])


def _deliver(signum: int, handler: object) -> None:
    """Run `handler` for a signal held back. A Python handler is called directly: raising the
    signal again could leave it pending for good where the thread blocks it (Ray's workers
    block SIGINT, and ray.cancel reaches a task as a simulated SIGINT)."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


@contextlib.contextmanager
def use_threads(count: int | None) -> Iterator[None]:
    """Run with `count` intra-op threads, restoring the previous setting afterwards."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_threads(world_size: int) -> int:
    """CPU threads per process when not given: torch's count (which honours OMP_NUM_THREADS)
    for one process; for several, this machine's cores shared out among its processes of the
    run (the launcher's LOCAL_WORLD_SIZE when set, as torchrun sets it, else `world_size`),
    not torchrun's default OMP_NUM_THREADS=1."""
    import torch

    if world_size == 1:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, usable_cores() // max(local, 1))


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NormcliError("device cuda: no CUDA GPU is available here; use cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise NormcliError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
