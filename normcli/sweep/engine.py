"""The sweep engine: each point as a Ray task, at most `workers` in flight, events reported from
the driver; `run_sweep` runs a manifest's points and keeps it current.

With no address the engine starts (and stops) a private Ray sized to this machine; with
`address` it joins a running cluster; if Ray is already initialized in this process it uses
that and leaves it running (see `cluster.ray_session`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError
from normcli.files import release_stale_claim
from normcli.runtime import configure_threads, interrupts_held
from normcli.sweep.claim import claim_sweep
from normcli.sweep.cluster import (
    check_engine_options,
    check_feasible,
    cluster_slots,
    import_ray,
    local_runs,
    one_line,
    ray_session,
)
from normcli.sweep.grid import Point
from normcli.sweep.manifest import (
    DEFAULT_SUFFIX,
    Manifest,
    check_suffix,
    load_manifest,
    manifest_points,
    update_point,
    write_manifest,
)

EventHandler = Callable[[str, str, dict], None]
STOP_GRACE_SECONDS = 5.0  # for an interrupted run to clean up before it is killed
Task = Callable[[dict, str], dict]


@dataclass
class Outcome:
    """How one point ended: 'done' with its result, or 'failed' with a one-line error."""

    status: str
    result: dict | None = None
    error: str | None = None
    attempts: int | None = None  # tries Ray made, when known
    seconds: float | None = None  # time the task itself ran, when it finished


def _attempt_number() -> int | None:
    """Which try of the current Ray task this is (0 first), from a private Ray API if present."""
    try:
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # a missing private API only costs the attempt count
        return None


def _run_point(task: Task, options: dict, output: str, cpus_per_run: int, driver_node: str) -> dict:
    """Ray task body: run `task` on one point; exceptions become a failure record, not a raise."""
    import ray

    # Set before the task imports torch (OpenMP reads it then), and for a torch already loaded
    # in this reused worker; one thread per reserved CPU stops runs fighting over cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(cpus_per_run)
    configure_threads(packed=True)  # runs side by side: OpenMP's short spin
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(cpus_per_run)
    attempt = _attempt_number()
    remote = ray.get_runtime_context().get_node_id() != driver_node
    target = output
    if remote and not os.path.isdir(os.path.dirname(output)):
        # No shared sweep folder on this node: write locally, the bytes go back to the driver.
        fd, target = tempfile.mkstemp(suffix=os.path.splitext(output)[1])
        os.close(fd)
        os.unlink(target)
    started = time.monotonic()
    try:
        result = task(dict(options), target)
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise TypeError(f"the task returned {type(result).__name__}, not a dict")
        result = json.loads(json.dumps(result))
        seconds = time.monotonic() - started
        payload = Path(target).read_bytes() if remote and os.path.isfile(target) else None
    except Exception as exc:
        return {"ok": False, "error": one_line(exc), "attempt": attempt}
    finally:
        if target != output:
            with contextlib.suppress(OSError):
                os.unlink(target)
    return {
        "ok": True,
        "result": result,
        "attempt": attempt,
        "seconds": seconds,
        "payload": payload,
    }


def save_payload(path: str | os.PathLike, payload: bytes) -> bool:
    """Write a remote run's output bytes at `path` unless the same file is there; True if so."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(payload) and path.read_bytes() == payload:
            return False
    from normcli.files import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))
    return True


def run_points(
    points: Iterable[Point],
    task: Task,
    *,
    folder: str | os.PathLike,
    suffix: str = DEFAULT_SUFFIX,
    workers: int | None = None,
    cpus_per_run: int = 1,
    gpus_per_run: float = 0.0,
    address: str | None = None,
    max_retries: int = 2,
    on_event: EventHandler | None = None,
    connect_timeout: float = 10.0,
    verbose: bool = False,
) -> dict[str, Outcome]:
    """Run `task(options, FOLDER/NAME+SUFFIX)` once per point as Ray tasks; outcomes by name.

    `task` must be a module-level function (Ray pickles it by reference). A worker process that
    dies is re-run up to `max_retries` times by Ray; an exception from the task fails that point
    only. `on_event(kind, name, info)` is called from this thread: 'started' (submitted, info
    has 'options'), 'finished' ('result', 'attempts', 'seconds'), 'failed' ('error', 'attempts').
    Ray's own logs and notices are shown only if `verbose`.
    """
    points = list(points)
    check_engine_options(workers, cpus_per_run, gpus_per_run, max_retries, address,
                         connect_timeout)  # fmt: skip
    _check_points(points, suffix)
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise NormcliError(f"sweep folder {folder} does not exist")
    if not points:
        return {}
    try:
        return _run_on_ray(points, task, folder, suffix, workers, cpus_per_run, gpus_per_run,
                           address, max_retries, on_event, connect_timeout, verbose)  # fmt: skip
    finally:
        for point in points:  # a run stopped by force (interrupted, killed) leaves its claim
            release_stale_claim(folder / (point.name + suffix))


def _run_on_ray(
    points: list[Point],
    task: Task,
    folder: Path,
    suffix: str,
    workers: int | None,
    cpus_per_run: int,
    gpus_per_run: float,
    address: str | None,
    max_retries: int,
    on_event: EventHandler | None,
    connect_timeout: float,
    verbose: bool,
) -> dict[str, Outcome]:
    """`run_points` once its arguments are checked: Ray started or joined, the points run."""
    ray = import_ray()
    runs = local_runs(workers, cpus_per_run, len(points))
    with ray_session(ray, address, runs, cpus_per_run, connect_timeout, verbose) as slots:
        check_feasible(ray, cpus_per_run, gpus_per_run)
        if workers is None and slots is None:
            slots = cluster_slots(ray, cpus_per_run, gpus_per_run)
        body = ray.remote(_run_point).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries
        )
        driver_node = ray.get_runtime_context().get_node_id()

        def submit(point: Point) -> Any:
            """Start the Ray task of one point."""
            output = str(folder / (point.name + suffix))
            return body.remote(task, point.options, output, cpus_per_run, driver_node)

        def collect(ref: Any, point: Point) -> Outcome:
            """The outcome of a point's finished task."""
            return _collect(ray, ref, folder / (point.name + suffix), max_retries)

        emit = on_event or (lambda kind, name, info: None)
        return _drive(ray, points, workers or slots or 1, submit, collect, emit)


@contextlib.contextmanager
def engine_session(
    *,
    points: int,
    workers: int | None = None,
    cpus_per_run: int = 1,
    gpus_per_run: float = 0.0,
    address: str | None = None,
    connect_timeout: float = 10.0,
    verbose: bool = False,
) -> Iterator[None]:
    """Ray started (for `points` points) or joined, and checked able to hold one run, for the
    `run_points` calls inside the block; stopped (or left) after it. Lets a caller write its
    files only once the engine is known to work."""
    check_engine_options(workers, cpus_per_run, gpus_per_run, 0, address, connect_timeout)
    ray = import_ray()
    runs = local_runs(workers, cpus_per_run, points)
    with ray_session(ray, address, runs, cpus_per_run, connect_timeout, verbose):
        check_feasible(ray, cpus_per_run, gpus_per_run)
        yield


def _drive(
    ray: Any,
    points: list[Point],
    limit: int,
    submit: Callable[[Point], Any],
    collect: Callable[[Any, Point], Outcome],
    emit: EventHandler,
) -> dict[str, Outcome]:
    """Keep up to `limit` points running until all have finished; outcomes by name."""
    waiting: deque[Point] = deque(points)
    running: dict[Any, Point] = {}
    outcomes: dict[str, Outcome] = {}
    try:
        while waiting or running:
            # Submit only what can run now, so 'started' means started (give or take a
            # worker's start-up) and --workers caps a shared cluster too.
            while waiting and len(running) < limit:
                point = waiting.popleft()
                running[submit(point)] = point
                emit("started", point.name, {"options": point.options})
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                point = running.pop(ref)
                outcome = outcomes[point.name] = collect(ref, point)
                if outcome.status == "done":
                    info = {"result": outcome.result, "seconds": outcome.seconds}
                    emit("finished", point.name, {**info, "attempts": outcome.attempts})
                else:
                    info = {"error": outcome.error, "attempts": outcome.attempts}
                    emit("failed", point.name, info)
    finally:
        _stop(ray, list(running))  # interrupted: leave no run going, on a shared cluster too
    return outcomes


def _stop(ray: Any, refs: list[Any]) -> None:
    """Stop the runs of `refs` as Ctrl-C stops a training (Ray raises KeyboardInterrupt in the
    task: its output claim is released, no temporary file is left), by force after a grace."""
    left = refs
    try:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if refs:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_SECONDS)
    finally:
        for ref in left:  # only those still running: Ray's core may abort on a finished one
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)


def _collect(ray: Any, ref: Any, output: Path, max_retries: int) -> Outcome:
    """The Outcome of a finished Ray task, writing a remote run's output bytes if needed."""
    try:
        value = ray.get(ref)
    except ray.exceptions.WorkerCrashedError as exc:
        return Outcome("failed", error=one_line(exc), attempts=max_retries + 1)
    except ray.exceptions.RayError as exc:  # node died, out of memory, cancelled, ...
        return Outcome("failed", error=one_line(exc))
    attempts = None if value["attempt"] is None else value["attempt"] + 1
    if not value["ok"]:
        return Outcome("failed", error=value["error"], attempts=attempts)
    if value["payload"] is not None:
        try:
            save_payload(output, value["payload"])
        except OSError as exc:
            return Outcome("failed", error=f"cannot write {output}: {exc.strerror or exc}")
    return Outcome("done", result=value["result"], attempts=attempts, seconds=value["seconds"])


def _check_points(points: list[Point], suffix: str) -> None:
    """Refuse a bad output suffix or two points of one name."""
    check_suffix(suffix)
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise NormcliError("two points of the sweep have the same name")


def run_sweep(
    folder: str | os.PathLike,
    task: Task,
    *,
    retry_failed: bool = True,
    on_event: EventHandler | None = None,
    **engine: Any,
) -> dict[str, Outcome]:
    """Run the manifest's points that are not done (`run_points` options in `engine`), keeping the
    manifest current; points interrupted mid-run go back to pending. The folder is held against
    other normcli processes meanwhile (normcli.sweep.claim)."""
    folder = Path(folder)
    with claim_sweep(folder):
        manifest = load_manifest(folder)
        entries = {e["name"]: e for e in manifest["points"]}

        def record(kind: str, name: str, info: dict) -> None:
            """Mirror an engine event into the manifest, then pass it on."""
            tries = entries[name]["attempts"] + (info.get("attempts") or 1)
            if kind == "started":
                update_point(folder, manifest, name, "running")
            elif kind == "finished":
                update_point(folder, manifest, name, "done", attempts=tries, result=info["result"])
            else:
                update_point(folder, manifest, name, "failed", attempts=tries, error=info["error"])
            if on_event is not None:
                on_event(kind, name, info)

        todo = manifest_points(manifest, retry_failed=retry_failed)
        try:
            return run_points(
                todo, task, folder=folder, suffix=manifest["suffix"], on_event=record, **engine
            )
        finally:
            with interrupts_held():  # a second Ctrl-C must not lose what the first one stopped
                _back_to_pending(folder, manifest)


def _back_to_pending(folder: Path, manifest: Manifest) -> None:
    """Points left 'running' (interrupted) become pending again, in the manifest file too."""
    interrupted = [e for e in manifest["points"] if e["status"] == "running"]
    for entry in interrupted:
        entry["status"] = "pending"
    if interrupted:
        write_manifest(folder, manifest)
