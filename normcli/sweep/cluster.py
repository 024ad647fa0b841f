"""Ray for a sweep: import it lazily, start a private Ray or join a cluster, size the runs.

Ray is imported only inside these functions, so `import normcli.sweep` works where Ray is not
installed; they then raise NormcliError(NEEDS_RAY).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError, one_line
from normcli.sweep.local import kept_signal_handlers, local_ray, ray_environment, ray_logging

NEEDS_RAY = "sweep needs Ray: pip install 'normcli[ray]'"


def import_ray() -> Any:
    """Ray, or the NormcliError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise NormcliError(NEEDS_RAY) from None
    return ray


@contextlib.contextmanager
def ray_session(
    ray: Any,
    address: str | None,
    runs: int,
    cpus_per_run: int,
    connect_timeout: float,
    verbose: bool = False,
) -> Iterator[int | None]:
    """Use the Ray already initialized here, join `address`, or start (and stop) a private Ray
    for `runs` runs at once (normcli.sweep.local); Ray's logs only if `verbose`.

    Yields how many runs fit at once when this function sized Ray itself, else None.
    """
    if ray.is_initialized():
        yield None  # someone else's Ray (a test fixture, a notebook): use it, leave it running
        return
    with ray_logging(verbose) as level:
        if address is None:
            with local_ray(ray, runs * cpus_per_run, level=level, verbose=verbose):
                yield runs
            return
        host, port = resolve_address(address)
        deadline = time.monotonic() + connect_timeout
        _check_reachable(host, port, connect_timeout)
        _use_auth_token_if_any()
        with kept_signal_handlers(), ray_environment():
            _guarded_init(ray, f"{host}:{port}", max(0.5, deadline - time.monotonic()), level)
        try:
            yield None
        finally:
            ray.shutdown()  # for a joined cluster this only disconnects this driver


def local_runs(workers: int | None, cpus_per_run: int, points: int) -> int:
    """How many runs a private Ray is sized for: `workers`, else as many as this machine's
    CPUs hold; never more than there are points."""
    return max(1, min(workers or usable_cpus() // cpus_per_run, points))


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_address(address: str) -> tuple[str, int]:
    """HOST and PORT of a Ray cluster from 'host:port' or 'auto' (RAY_ADDRESS, then the address
    file `ray start` writes)."""
    text = address.strip()
    if text == "auto":
        text = os.environ.get("RAY_ADDRESS", "").strip()
        if text in ("", "auto", "local"):
            try:
                text = _ray_address_file().read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                text = ""
        if not text:
            raise NormcliError(
                "no running Ray cluster found: start one with `ray start --head`, "
                "or give its HOST:PORT"
            )
    if "://" in text:
        raise NormcliError(
            f"Ray address {text}: Ray Client (ray://) addresses are not supported; "
            "give the cluster's HOST:PORT (its GCS port, 6379 by default)"
        )
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NormcliError(f"Ray address {text!r} is not HOST:PORT or 'auto'")
    return host, int(port)


def _ray_address_file() -> Path:
    """Where `ray start --head` records the address of the newest cluster on this machine."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray" / "ray_current_cluster"


def _check_reachable(host: str, port: int, timeout: float) -> None:
    """Fail fast, in one line, when nothing listens at HOST:PORT (ray.init retries for minutes)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError:
        raise NormcliError(f"no Ray cluster at {host}:{port}: no answer in {timeout:g} s") from None
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        raise NormcliError(f"no Ray cluster at {host}:{port}: {reason.lower()}") from None


def _use_auth_token_if_any() -> None:
    """Send this machine's Ray auth token when joining, as `ray start` and ray.init('auto') do.

    Ray turns token authentication on for local clusters once a token exists (the first local
    ray.init writes ~/.ray/auth_token), but not for a driver given an explicit address: without
    this, joining such a cluster by HOST:PORT just retries until the connect timeout.
    RAY_AUTH_MODE, when set, is left to decide.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:  # private Ray API: absent from Rays without token authentication
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:
        return
    quiet = logging.getLogger(auth.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "token authentication is enabled" notice is noise here
    try:
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception:  # no token handling is better than no sweep
        pass
    finally:
        quiet.setLevel(level)


def _guarded_init(ray: Any, address: str, timeout: float, level: int) -> None:
    """ray.init(address) in a helper thread, abandoned after `timeout` s: something may listen
    at the port without being a Ray cluster, and ray.init would then retry for minutes."""
    lock = threading.Lock()
    state: dict[str, Any] = {"abandoned": False, "error": None}
    done = threading.Event()

    def connect() -> None:
        """Join the cluster; if the driver gave up meanwhile, leave it again."""
        error = None
        try:
            ray.init(address=address, log_to_driver=level < logging.ERROR, logging_level=level)
        except BaseException as exc:  # handed to the driver thread below
            error = exc
        with lock:
            if state["abandoned"]:
                if error is None:
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                return
            state["error"] = error
            done.set()

    threading.Thread(target=connect, name="normcli-ray-connect", daemon=True).start()
    done.wait(timeout)
    with lock:
        if not done.is_set():
            state["abandoned"] = True
            raise NormcliError(
                f"the Ray cluster at {address} did not answer within {timeout:.3g} s (is that its "
                "GCS port? does it need another auth token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH?)"
            )
    if state["error"] is not None:
        raise NormcliError(f"cannot join the Ray cluster at {address}: {one_line(state['error'])}")


def check_engine_options(
    workers: int | None = None,
    cpus_per_run: int = 1,
    gpus_per_run: float = 0.0,
    max_retries: int = 2,
    address: str | None = None,
    connect_timeout: float = 10.0,
) -> None:
    """Refuse impossible engine settings (named as `run_points` names them) before anything is
    started or written; with no `address`, also more CPUs than this machine has."""
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise NormcliError(f"workers must be a whole number >= 1, not {workers!r}")
    if not isinstance(cpus_per_run, int) or cpus_per_run < 1:
        raise NormcliError(f"cpus_per_run must be a whole number >= 1, not {cpus_per_run!r}")
    _check_gpus(gpus_per_run)
    if not isinstance(max_retries, int) or max_retries < 0:
        raise NormcliError(f"max_retries must be a whole number >= 0, not {max_retries!r}")
    if not connect_timeout > 0:
        raise NormcliError(f"the connect timeout must be > 0 seconds, not {connect_timeout!r}")
    if address is None and not _ray_initialized():
        _check_fits_here(workers or 1, cpus_per_run)


def _check_gpus(gpus_per_run: float) -> None:
    """A GPU share: a fraction of one GPU, or a whole number of them (Ray's rule)."""
    if not (isinstance(gpus_per_run, (int, float)) and 0 <= gpus_per_run < float("inf")):
        raise NormcliError(f"gpus_per_run must be a number >= 0, not {gpus_per_run!r}")
    if gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
        raise NormcliError(f"gpus_per_run above 1 must be a whole number, not {gpus_per_run:g}")


def _ray_initialized() -> bool:
    """Whether this process already uses a Ray (then it is sized by whoever started it)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _check_fits_here(workers: int, cpus_per_run: int) -> None:
    """Refuse runs at once that need more CPUs than this machine has: a private Ray would start
    a worker process (a torch import, hundreds of MB) for every CPU it is given."""
    cpus = usable_cpus()
    if cpus_per_run > cpus:
        raise NormcliError(f"cpus_per_run {cpus_per_run}: this machine has {cpus} CPUs")
    if workers * cpus_per_run > cpus:
        raise NormcliError(
            f"workers {workers} runs at once need {workers * cpus_per_run} CPUs "
            f"({cpus_per_run} per run); this machine has {cpus}; join a Ray cluster for more"
        )


def check_feasible(ray: Any, cpus_per_run: int, gpus_per_run: float) -> None:
    """Refuse runs no node can hold: Ray would otherwise queue them forever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus_per_run and r.get("GPU", 0) >= gpus_per_run for r in nodes):
        return
    cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    raise NormcliError(
        f"no Ray node has {cpus_per_run} CPUs and {gpus_per_run:g} GPUs for one run "
        f"(the largest node has {cpus:g} CPUs, {gpus:g} GPUs)"
    )


def cluster_slots(ray: Any, cpus_per_run: int, gpus_per_run: float) -> int:
    """How many runs the whole cluster holds at once."""
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0) // cpus_per_run)
    if gpus_per_run > 0:
        slots = min(slots, int(resources.get("GPU", 0) // gpus_per_run))
    return max(1, slots)
