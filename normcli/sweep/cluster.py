"""Ray for a sweep: import it lazily, start a private Ray or join a cluster, size the runs.

Ray is imported only inside these functions, so `import normcli.sweep` works where Ray is not
installed; they then raise NormcliError(NEEDS_RAY).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError

# Small but comfortable for checkpoints of small CNNs; the default (30% of RAM) is far more
# than a sweep of tiny runs needs and would crowd a 24 GiB machine.
OBJECT_STORE_BYTES = 160 * 1024**2
NEEDS_RAY = "sweep needs Ray: pip install 'normcli[ray]'"


def import_ray() -> Any:
    """Ray, or the NormcliError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise NormcliError(NEEDS_RAY) from None
    return ray


def one_line(exc: BaseException) -> str:
    """An exception as one short line: 'Type: first line of the message'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(exc, NormcliError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def ray_session(
    ray: Any, address: str | None, workers: int | None, cpus_per_run: int, connect_timeout: float
) -> Iterator[int | None]:
    """Use the Ray already initialized here, join `address`, or start (and stop) a local Ray.

    Yields how many runs fit at once when this function sized Ray itself, else None.
    """
    if ray.is_initialized():
        yield None  # someone else's Ray (a test fixture, a notebook): use it, leave it running
        return
    if address is None:
        count = workers or max(1, (os.cpu_count() or 1) // cpus_per_run)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            # "local" and not None: None would join whatever RAY_ADDRESS or /tmp/ray points at.
            ray.init(
                address="local",
                num_cpus=count * cpus_per_run,
                include_dashboard=False,
                log_to_driver=False,  # workers' prints would tear through the progress bar
                object_store_memory=OBJECT_STORE_BYTES,
                logging_level=logging.ERROR,
            )
        except Exception as exc:
            raise NormcliError(f"could not start Ray on this machine: {one_line(exc)}") from None
    else:
        host, port = resolve_address(address)
        deadline = time.monotonic() + connect_timeout
        _check_reachable(host, port, connect_timeout)
        _use_auth_token_if_any()
        _guarded_init(ray, f"{host}:{port}", max(0.5, deadline - time.monotonic()))
        count = None
    try:
        yield count
    finally:
        ray.shutdown()  # for a joined cluster this only disconnects this driver


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


def _guarded_init(ray: Any, address: str, timeout: float) -> None:
    """ray.init(address) in a helper thread, abandoned after `timeout` s: something may listen
    at the port without being a Ray cluster, and ray.init would then retry for minutes."""
    lock = threading.Lock()
    state: dict[str, Any] = {"abandoned": False, "error": None}
    done = threading.Event()

    def connect() -> None:
        """Join the cluster; if the driver gave up meanwhile, leave it again."""
        error = None
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
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
