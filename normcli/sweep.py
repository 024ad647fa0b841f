"""Sweep engine: expand an option grid, keep a manifest, run each point as a Ray task, aggregate.

Usable without the CLI. Ray is imported lazily, inside the functions that need it, so
`import normcli.sweep` works where Ray is not installed; those functions then raise
NormcliError("sweep needs Ray: pip install 'normcli[ray]'").

The pieces:

- `expand_grid` turns {option: [values]} plus fixed options into `Point`s (a name that is a
  safe file name, and the full options of one run).
- The manifest (`manifest.json` in the sweep folder) records the grid, the fixed options and
  each point's status, attempts, last error, output file name and result. Only the driver
  writes it, always whole and atomically (temp file in the same folder, then os.replace), so a
  crash or Ctrl-C never leaves a half-written manifest. `open_sweep` creates it, resumes it, or
  extends it with new points; `run_sweep` runs the points not done yet and keeps it current.
- `run_points` is the engine: one Ray task per point, at most `workers` in flight, events
  reported from the driver. With no address it starts (and stops) a private Ray sized to this
  machine; with `address` it joins a running cluster; if Ray is already initialized in this
  process it uses that and leaves it running.
- `aggregate` reduces result records to one row per group with n, mean, sample std, min, max.

Where outputs go on a cluster: `task(options, output)` is called with `output` an absolute path
in the sweep folder. On one machine the task simply writes there. On a cluster the sweep folder
should be on a file system shared by all nodes (NFS or similar) at the same path, so that a
task writes its file where the driver will look. Tasks that run on another node than the driver
also send the bytes of the file they wrote back with their result; the driver writes them into
the sweep folder (atomically) only when its own copy is missing or different. So a cluster
without a shared folder still ends with every output in the driver's sweep folder, as long as
each file fits comfortably in Ray's object store (checkpoints of small CNNs do); if the sweep
folder does not exist on a worker's node, the task writes to a temporary file there instead.
The task function and normcli itself must be importable on every node (same environment).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
STATUSES = ("pending", "running", "done", "failed")
DEFAULT_SUFFIX = ".safetensors"
# Small but comfortable for checkpoints of small CNNs; the default (30% of RAM) is far more
# than a sweep of tiny runs needs and would crowd a 24 GiB machine.
OBJECT_STORE_BYTES = 160 * 1024**2
NEEDS_RAY = "sweep needs Ray: pip install 'normcli[ray]'"

_NAME_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-=,")
_MAX_NAME = 200  # leaves room for a suffix within the usual 255-byte file-name limit
_SHOWN = 4  # how many point names an error message lists before "+N more"

EventHandler = Callable[[str, str, dict], None]
Task = Callable[[dict, str], dict]


# ---------------------------------------------------------------------------------------------
# Grid


@dataclass(frozen=True)
class Point:
    """One run of a sweep: a unique file-safe name and its full options (treat as read-only)."""

    name: str
    options: dict = field(hash=False)


def format_value(value: Any) -> str:
    """A short, file-name-safe spelling of one option value (floats compact: 1e-4, 0.5)."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = _compact_float(value)
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        raise NormcliError(f"option value {value!r} is not a number, a word, true/false or null")
    return "".join(c if c in _NAME_SAFE else "~" for c in text) or "~"


def _compact_float(value: float) -> str:
    """The shorter of the plain and the exponent spelling that both read back as `value`."""
    if not math.isfinite(value):
        return repr(value)
    plain = repr(value)
    plain = plain[:-2] if plain.endswith(".0") else plain
    for digits in range(17):
        exp = f"{value:.{digits}e}"
        if float(exp) == value:
            break
    mantissa, power = exp.split("e")
    exp = f"{mantissa}e{int(power)}"
    return exp if len(exp) < len(plain) or "e" in plain else plain


def expand_grid(swept: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any]) -> list[Point]:
    """All combinations of the swept values (key order, then value order) on top of `fixed`."""
    if not swept:
        raise NormcliError("nothing to sweep: give at least one option with a list of values")
    for key, values in swept.items():
        _check_values(key, values, fixed)
    keys = list(swept)
    labels = {key: _safe_key(key) for key in keys}
    points = []
    for combo in itertools.product(*(swept[k] for k in keys)):
        name = "_".join(f"{labels[k]}-{format_value(v)}" for k, v in zip(keys, combo, strict=True))
        if len(name) > _MAX_NAME:
            # A hash of the full name keeps long names unique.
            digest = hashlib.sha256(name.encode()).hexdigest()[:10]
            name = f"{name[: _MAX_NAME - 11]}-{digest}"
        points.append(Point(name, {**fixed, **dict(zip(keys, combo, strict=True))}))
    seen: dict[str, Point] = {}
    for point in points:
        if point.name in seen:
            raise NormcliError(
                f"two runs of the sweep would both be named {point.name}; "
                "use values that differ in their letters and digits"
            )
        seen[point.name] = point
    return points


def _check_values(key: str, values: Any, fixed: Mapping[str, Any]) -> None:
    """Refuse a swept option that is also fixed, not a list, empty, or with a repeat."""
    if key in fixed:
        raise NormcliError(f"option {key} is both swept and fixed; give it once")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise NormcliError(f"option {key}: the swept values must be a list")
    if not values:
        raise NormcliError(f"option {key}: the list of values to sweep is empty")
    for i, value in enumerate(values):
        # == on purpose: 1 and 1.0 are the same run, so a repeat of either is refused.
        if any(value == earlier for earlier in values[:i]):
            raise NormcliError(f"option {key}: value {value!r} is given twice")


def _safe_key(key: str) -> str:
    """An option name as it appears in run names: safe characters, no leading dot."""
    if not isinstance(key, str) or not key:
        raise NormcliError(f"option name {key!r} must be a non-empty word")
    text = "".join(c if c in _NAME_SAFE else "~" for c in key)
    return "~" + text[1:] if text.startswith(".") else text


# ---------------------------------------------------------------------------------------------
# Manifest


def new_manifest(
    swept: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any], *, suffix: str = DEFAULT_SUFFIX
) -> dict:
    """A manifest (not yet written) with every point of the grid pending."""
    if not suffix.startswith(".") or "/" in suffix or os.sep in suffix:
        raise NormcliError(f"output suffix {suffix!r} must start with '.' and name no folder")
    points = expand_grid(swept, fixed)
    return {
        "format": MANIFEST_FORMAT,
        "swept": _as_json({k: list(v) for k, v in swept.items()}, "swept options"),
        "fixed": _as_json(dict(fixed), "fixed options"),
        "suffix": suffix,
        "points": [_new_entry(p, suffix) for p in points],
    }


def _new_entry(point: Point, suffix: str) -> dict:
    """The manifest entry of a point that has not run yet."""
    return {
        "name": point.name,
        "options": _as_json(point.options, f"options of {point.name}"),
        "status": "pending",
        "attempts": 0,
        "error": None,
        "output": point.name + suffix,
        "result": None,
    }


def _as_json(value: Any, what: str) -> Any:
    """`value` as it reads back from JSON (tuples become lists), refused if JSON cannot hold it."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise NormcliError(f"{what} cannot be saved as JSON: {exc}") from None


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write FOLDER/manifest.json atomically: a temp file in the same folder, then os.replace."""
    from normcli.checkpoint import atomic_write  # the one atomic writer

    path = Path(folder) / MANIFEST_NAME
    text = json.dumps(manifest, indent=1) + "\n"  # serialize first: a failure writes nothing
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def create_manifest(
    folder: str | os.PathLike,
    swept: Mapping[str, Sequence[Any]],
    fixed: Mapping[str, Any],
    *,
    suffix: str = DEFAULT_SUFFIX,
) -> dict:
    """Create the sweep folder's manifest with every point pending; refuse to replace one."""
    folder = Path(folder)
    if (folder / MANIFEST_NAME).exists():
        raise NormcliError(
            f"{folder / MANIFEST_NAME} exists already; resume it or pick a new folder"
        )
    manifest = new_manifest(swept, fixed, suffix=suffix)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, manifest)
    return manifest


def load_manifest(folder: str | os.PathLike) -> dict:
    """Read and check FOLDER/manifest.json: NormcliError if missing, malformed or foreign."""
    path = Path(folder) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NormcliError(f"{path} not found: {folder} is not a sweep folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NormcliError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NormcliError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    problem = _manifest_problem(data)
    if problem:
        raise NormcliError(f"{path} is not a normcli sweep manifest: {problem}")
    return data


def _manifest_problem(data: Any) -> str | None:
    """What is wrong with a parsed manifest, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("format") != MANIFEST_FORMAT:
        return f"format {data.get('format')!r}, this normcli reads format {MANIFEST_FORMAT}"
    swept, fixed, points = data.get("swept"), data.get("fixed"), data.get("points")
    if not isinstance(swept, dict) or not all(isinstance(v, list) and v for v in swept.values()):
        return "'swept' must map option names to non-empty lists"
    if not isinstance(fixed, dict):
        return "'fixed' must be an object"
    suffix = data.get("suffix")
    if not isinstance(suffix, str) or not suffix.startswith(".") or "/" in suffix:
        return "'suffix' must be a file suffix such as .safetensors"
    if not isinstance(points, list) or not points:
        return "'points' must be a non-empty list"
    names: set[str] = set()
    for i, entry in enumerate(points):
        problem = _point_problem(i, entry, names)
        if problem:
            return problem
    return None


def _is_file_name(value: Any) -> bool:
    """A plain file name: text, not empty, no folder, not hidden."""
    return isinstance(value, str) and bool(value) and "/" not in value and value[0] != "."


def _point_problem(i: int, entry: Any, names: set[str]) -> str | None:
    """What is wrong with manifest point `i` (names: those seen so far), or None."""
    if not isinstance(entry, dict):
        return f"point {i} is not an object"
    name, output = entry.get("name"), entry.get("output")
    if not _is_file_name(name):
        return f"point {i} has no valid name"
    if name in names:
        return f"point {name} appears twice"
    names.add(name)
    attempts = entry.get("attempts")
    checks = (
        (isinstance(entry.get("options"), dict), "'options' must be an object"),
        (entry.get("status") in STATUSES, f"status must be one of {', '.join(STATUSES)}"),
        (isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0,
         "'attempts' must be a whole number >= 0"),
        (entry.get("error") is None or isinstance(entry["error"], str),
         "'error' must be text or null"),
        (_is_file_name(output), "'output' must be a file name"),
        (entry.get("result") is None or isinstance(entry["result"], dict),
         "'result' must be an object or null"),
    )  # fmt: skip
    for good, what in checks:
        if not good:
            return f"point {name}: {what}"
    return None


def update_point(
    folder: str | os.PathLike,
    manifest: dict,
    name: str,
    status: str,
    *,
    attempts: int | None = None,
    error: str | None = None,
    result: dict | None = None,
) -> dict:
    """Set one point's status (driver only) and rewrite the manifest atomically; returns the entry.

    `error` and `result` replace the stored ones (so a finished point loses an earlier error);
    `attempts`, when given, replaces the stored count.
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    entry = next((e for e in manifest["points"] if e["name"] == name), None)
    if entry is None:
        raise KeyError(f"no point named {name} in the manifest")
    entry["status"] = status
    entry["error"] = error
    entry["result"] = result
    if attempts is not None:
        entry["attempts"] = attempts
    write_manifest(folder, manifest)
    return entry


def compare_manifest(
    manifest: dict,
    swept: Mapping[str, Sequence[Any]],
    fixed: Mapping[str, Any],
    *,
    extend: bool = False,
    where: str = "this folder",
) -> str:
    """'resume' when the request has the manifest's points, 'extend' when it adds points (and
    `extend`); otherwise a NormcliError naming the differing fixed option or points."""
    _check_same_fixed(manifest["fixed"], _as_json(dict(fixed), "fixed options"), where)
    if set(manifest["swept"]) != set(swept):
        raise NormcliError(
            f"the sweep in {where} sweeps {', '.join(manifest['swept'])}; "
            f"this request sweeps {', '.join(swept)}"
        )
    old = {_identity(e["options"]): e["name"] for e in manifest["points"]}
    new = {_identity(p.options): p.name for p in expand_grid(swept, fixed)}
    missing = [name for key, name in old.items() if key not in new]
    added = [name for key, name in new.items() if key not in old]
    if missing:
        extra = f"; new: {_names(added)}" if added else ""
        raise NormcliError(
            f"the sweep in {where} has runs this request lacks: {_names(missing)}{extra} "
            "(repeat the old values, or use a new folder)"
        )
    if not added:
        return "resume"
    if not extend:
        raise NormcliError(
            f"this request adds {len(added)} runs to the sweep in {where} ({_names(added)}); "
            "pass --extend to add them"
        )
    return "extend"


def _check_same_fixed(old_fixed: dict, new_fixed: dict, where: str) -> None:
    differing = [
        k for k in {**old_fixed, **new_fixed} if old_fixed.get(k, ...) != new_fixed.get(k, ...)
    ]
    if differing:
        shown = ", ".join(
            f"{k} ({_show(old_fixed, k)} there, {_show(new_fixed, k)} now)" for k in differing
        )
        raise NormcliError(f"the sweep in {where} has other fixed options: {shown}")


def _identity(options: Mapping[str, Any]) -> str:
    """A point's identity: its options as canonical JSON (so key order does not matter)."""
    return json.dumps(_as_json(dict(options), "options"), sort_keys=True)


def _show(options: Mapping[str, Any], key: str) -> str:
    """An option's value for a message, or 'unset'."""
    return json.dumps(options[key]) if key in options else "unset"


def _names(names: Sequence[str]) -> str:
    """The first few names, then how many more."""
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def open_sweep(
    folder: str | os.PathLike,
    swept: Mapping[str, Sequence[Any]],
    fixed: Mapping[str, Any],
    *,
    extend: bool = False,
    suffix: str = DEFAULT_SUFFIX,
) -> tuple[dict, str]:
    """Create, resume or extend the sweep in `folder`; returns (manifest, 'new'|'resume'|'extend').

    Extending keeps the old points' entries (status, attempts, results) and adds the new points
    as pending, in the new grid's order.
    """
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).exists():
        return create_manifest(folder, swept, fixed, suffix=suffix), "new"
    manifest = load_manifest(folder)
    action = compare_manifest(manifest, swept, fixed, extend=extend, where=str(folder))
    if action == "extend":
        old = {_identity(e["options"]): e for e in manifest["points"]}
        fresh = new_manifest(swept, fixed, suffix=manifest["suffix"])
        fresh["points"] = [old.get(_identity(e["options"]), e) for e in fresh["points"]]
        manifest = fresh
        write_manifest(folder, manifest)
    return manifest, action


def manifest_points(manifest: dict, *, retry_failed: bool = True) -> list[Point]:
    """The points still to run: pending, interrupted ('running') and, if asked, failed ones."""
    skip = {"done"} if retry_failed else {"done", "failed"}
    return [Point(e["name"], e["options"]) for e in manifest["points"] if e["status"] not in skip]


def records(manifest: dict) -> list[dict]:
    """One record per finished point: its options merged with its result, for `aggregate`."""
    return [
        {**e["options"], **(e["result"] or {})} for e in manifest["points"] if e["status"] == "done"
    ]


# ---------------------------------------------------------------------------------------------
# Engine


@dataclass
class Outcome:
    """How one point ended: 'done' with its result, or 'failed' with a one-line error."""

    status: str
    result: dict | None = None
    error: str | None = None
    attempts: int | None = None  # tries Ray made, when known
    seconds: float | None = None  # time the task itself ran, when it finished


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
    from normcli.checkpoint import atomic_write

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
) -> dict[str, Outcome]:
    """Run `task(options, FOLDER/NAME+SUFFIX)` once per point as Ray tasks; outcomes by name.

    `task` must be a module-level function (Ray pickles it by reference). A worker process that
    dies is re-run up to `max_retries` times by Ray; an exception from the task fails that point
    only. `on_event(kind, name, info)` is called from this thread: 'started' (submitted, info
    has 'options'), 'finished' ('result', 'attempts', 'seconds'), 'failed' ('error', 'attempts').
    """
    points = list(points)
    _check_engine_args(
        points, suffix, workers, cpus_per_run, gpus_per_run, max_retries, connect_timeout
    )
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise NormcliError(f"sweep folder {folder} does not exist")
    if not points:
        return {}
    ray = import_ray()
    emit = on_event or (lambda kind, name, info: None)
    with _ray_session(ray, address, workers, cpus_per_run, connect_timeout) as slots:
        _check_feasible(ray, cpus_per_run, gpus_per_run)
        if workers is None and slots is None:
            slots = _cluster_slots(ray, cpus_per_run, gpus_per_run)
        limit = workers or slots or 1
        body = ray.remote(_run_point).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries
        )
        driver_node = ray.get_runtime_context().get_node_id()
        waiting: deque[Point] = deque(points)
        running: dict[Any, Point] = {}
        outcomes: dict[str, Outcome] = {}
        try:
            while waiting or running:
                # Submit only what can run now, so 'started' means started (give or take a
                # worker's start-up) and --workers caps a shared cluster too.
                while waiting and len(running) < limit:
                    point = waiting.popleft()
                    output = str(folder / (point.name + suffix))
                    ref = body.remote(task, point.options, output, cpus_per_run, driver_node)
                    running[ref] = point
                    emit("started", point.name, {"options": point.options})
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    point = running.pop(ref)
                    outcome = _collect(ray, ref, folder / (point.name + suffix), max_retries)
                    outcomes[point.name] = outcome
                    if outcome.status == "done":
                        info = {"result": outcome.result, "seconds": outcome.seconds}
                        emit("finished", point.name, {**info, "attempts": outcome.attempts})
                    else:
                        info = {"error": outcome.error, "attempts": outcome.attempts}
                        emit("failed", point.name, info)
        finally:
            for ref in running:  # interrupted: do not leave runs going on a shared cluster
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
    return outcomes


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


def _check_engine_args(
    points: list[Point],
    suffix: str,
    workers: int | None,
    cpus_per_run: int,
    gpus_per_run: float,
    max_retries: int,
    connect_timeout: float,
) -> None:
    """Refuse impossible engine settings before starting anything."""
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise NormcliError(f"--workers must be a whole number >= 1, not {workers!r}")
    if not isinstance(cpus_per_run, int) or cpus_per_run < 1:
        raise NormcliError(f"--cpus-per-run must be a whole number >= 1, not {cpus_per_run!r}")
    if not gpus_per_run >= 0:
        raise NormcliError(f"--gpus-per-run must be >= 0, not {gpus_per_run!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise NormcliError(f"--max-retries must be a whole number >= 0, not {max_retries!r}")
    if not connect_timeout > 0:
        raise NormcliError(f"the connect timeout must be > 0 seconds, not {connect_timeout!r}")
    if not suffix.startswith(".") or "/" in suffix or os.sep in suffix:
        raise NormcliError(f"output suffix {suffix!r} must start with '.' and name no folder")
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise NormcliError("two points of the sweep have the same name")


@contextlib.contextmanager
def _ray_session(
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


def _check_feasible(ray: Any, cpus_per_run: int, gpus_per_run: float) -> None:
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


def _cluster_slots(ray: Any, cpus_per_run: int, gpus_per_run: float) -> int:
    """How many runs the whole cluster holds at once."""
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0) // cpus_per_run)
    if gpus_per_run > 0:
        slots = min(slots, int(resources.get("GPU", 0) // gpus_per_run))
    return max(1, slots)


def run_sweep(
    folder: str | os.PathLike,
    task: Task,
    *,
    retry_failed: bool = True,
    on_event: EventHandler | None = None,
    **engine: Any,
) -> dict[str, Outcome]:
    """Run the manifest's points that are not done (`run_points` options in `engine`), keeping the
    manifest current; points interrupted mid-run go back to pending."""
    folder = Path(folder)
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
        interrupted = [e for e in manifest["points"] if e["status"] == "running"]
        for entry in interrupted:
            entry["status"] = "pending"
        if interrupted:
            write_manifest(folder, manifest)


# ---------------------------------------------------------------------------------------------
# Aggregation


def aggregate(
    records: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str]
) -> list[dict]:
    """One row per combination of the `group_by` values, with n, mean, std, min, max per metric.

    Groups come in first-seen order, except that a key whose values are all numbers sorts
    numerically. std is the sample standard deviation (None for one value). A record without a
    metric (or with null) is left out of that metric only.
    """
    if not records:
        return []
    _check_keys(records, group_by, metrics)
    groups: dict[str, tuple[list, list]] = {}
    for record in records:
        values = [record.get(k) for k in group_by]
        key = json.dumps(values, sort_keys=True, default=repr)
        groups.setdefault(key, (values, []))[1].append(record)
    rows = []
    for values, members in _in_order(list(groups.values()), len(group_by)):
        row: dict[str, Any] = dict(zip(group_by, values, strict=True))
        for metric in metrics:
            row[metric] = _stats(metric, [r[metric] for r in members if r.get(metric) is not None])
        rows.append(row)
    return rows


def _check_keys(
    records: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str]
) -> None:
    """Refuse group keys or metrics no record has, and a key that is both."""
    available = list(dict.fromkeys(k for r in records for k in r))
    for kind, keys in (("group key", group_by), ("metric", metrics)):
        unknown = [k for k in keys if k not in available]
        if unknown:
            raise NormcliError(
                f"unknown {kind} {', '.join(unknown)}; available: {', '.join(available)}"
            )
    both = [k for k in group_by if k in metrics]
    if both:
        raise NormcliError(f"{', '.join(both)} cannot be both a group key and a metric")


def _in_order(groups: list[tuple[list, list]], keys: int) -> list[tuple[list, list]]:
    """Groups sorted key by key: numerically where a key's values are all numbers, else in
    first-seen order."""
    ranks = []
    for i in range(keys):
        column = [values[i] for values, _ in groups]
        if all(_is_number(v) for v in column):
            ranks.append(column)
        else:
            first: dict[str, int] = {}
            ranks.append(
                [first.setdefault(json.dumps(v, default=repr), len(first)) for v in column]
            )
    order = sorted(range(len(groups)), key=lambda g: tuple(rank[g] for rank in ranks))
    return [groups[g] for g in order]


def _is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stats(metric: str, values: list) -> dict:
    """n, mean, sample std (None below two values), min and max of a metric's values."""
    bad = next((v for v in values if not _is_number(v)), None)
    if bad is not None:
        raise NormcliError(f"metric {metric} has a value that is not a number: {bad!r}")
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


# ---------------------------------------------------------------------------------------------
# normcli runs as sweep points, and checkpoints as records for aggregation


def train_point(
    options: dict, output: str, *, data_dir: str | None = None, device: str = "cpu"
) -> dict:
    """Sweep task: train one point's run into `output` and return its final metrics. A file
    already there is a previous attempt of this point (its worker died): it is resumed from
    its last saved epoch, to exactly the weights an uninterrupted run reaches."""
    from normcli.config import RunSpec
    from normcli.train import resume_training, train

    path = Path(output)
    if path.exists():
        result = resume_training(path, data_dir=data_dir, device=device)
    else:
        spec = RunSpec.from_options(**options)
        result = train(spec, data_dir=data_dir, device=device, out=path)
    return final_metrics(result.history) | {"params": result.params}


# Metrics of a finished run, from the last row of its history (test_error = 100 - accuracy,
# the GN paper's axis).
RUN_METRICS = ("test_accuracy", "test_error", "test_loss", "val_accuracy", "val_error",
               "val_loss", "train_loss", "seconds")  # fmt: skip


def final_metrics(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The run's final test (and validation) metrics and its total training seconds."""
    if not history:
        return {}
    last = history[-1]
    out = {k: last[k] for k in ("test_accuracy", "test_loss", "train_loss") if k in last}
    out["test_error"] = 100.0 - last["test_accuracy"]
    if "val_accuracy" in last:
        out |= {"val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"],
                "val_error": 100.0 - last["val_accuracy"]}  # fmt: skip
    out["seconds"] = sum(row["seconds"] for row in history)
    out["epochs"] = len(history)
    return out


def checkpoint_records(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """One record per checkpoint for `aggregate`: every run option, the run's label, and its
    final metrics (from the stored history: no re-evaluation)."""
    from normcli.checkpoint import read_metadata

    rows = []
    for path in paths:
        meta = read_metadata(path)
        rows.append({**meta.run.options(), "label": meta.label, "path": str(path),
                     **final_metrics(meta.history)})  # fmt: skip
    return rows


def study_table(
    paths: Sequence[str | os.PathLike], group_by: Sequence[str], metrics: Sequence[str] = ()
) -> list[dict]:
    """`aggregate` over checkpoints: one row per group of `group_by` values, with n, mean, std,
    min, max of each metric (default: test accuracy and loss, validation accuracy if any)."""
    rows = checkpoint_records(paths)
    if not metrics:
        metrics = ["test_accuracy", "test_loss"]
        if any("val_accuracy" in r for r in rows):
            metrics.append("val_accuracy")
    return aggregate(rows, list(group_by), list(metrics))
