"""The sweep manifest: FOLDER/manifest.json records the grid, the fixed options and each point's
status, attempts, last error, output file name and result.

Only the driver writes it, always whole and atomically (temp file in the same folder, then
os.replace), so a crash or Ctrl-C never leaves a half-written manifest. `open_sweep` creates
it, resumes it, or extends it with new points. A manifest read back is checked against the
`Manifest` record by config's one validator, then for the values types cannot say.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from normcli.errors import NormcliError
from normcli.sweep.grid import Point, expand_grid, names

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
STATUSES = ("pending", "running", "done", "failed")
MAX_MANIFEST_BYTES = 256 * 1024**2  # a point takes a few hundred bytes
MAX_DEPTH = 32  # of nested lists and objects: a manifest has 4, an option value a few more
DEFAULT_SUFFIX = ".safetensors"


class PointEntry(TypedDict):
    """One point in the manifest: what it runs and how it went."""

    name: str  # the point's name: a plain file name, unique in the sweep
    options: dict[str, Any]  # every run option
    status: str  # one of STATUSES
    attempts: int  # tries so far
    error: str | None  # the last failure, one line; None once done
    output: str  # the output's file name in the sweep folder
    result: dict[str, Any] | None  # what the task returned, once done


class Manifest(TypedDict):
    """manifest.json: the grid and every point's entry."""

    format: int  # MANIFEST_FORMAT
    swept: dict[str, list[Any]]  # option -> its values, in grid order
    fixed: dict[str, Any]  # the options every point shares
    suffix: str  # of every output file name
    points: list[PointEntry]


def check_suffix(suffix: str) -> None:
    """Refuse an output suffix that does not start with '.' or names a folder."""
    if not _is_suffix(suffix):
        raise NormcliError(f"output suffix {suffix!r} must start with '.' and name no folder")


def _is_suffix(suffix: str) -> bool:
    return suffix.startswith(".") and "/" not in suffix and os.sep not in suffix


def new_manifest(
    swept: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any], *, suffix: str = DEFAULT_SUFFIX
) -> Manifest:
    """A manifest (not yet written) with every point of the grid pending."""
    check_suffix(suffix)
    points = expand_grid(swept, fixed)
    return {
        "format": MANIFEST_FORMAT,
        "swept": _as_json({k: list(v) for k, v in swept.items()}, "swept options"),
        "fixed": _as_json(dict(fixed), "fixed options"),
        "suffix": suffix,
        "points": [_new_entry(p, suffix) for p in points],
    }


def _new_entry(point: Point, suffix: str) -> PointEntry:
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


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write FOLDER/manifest.json atomically: a temp file in the same folder, then os.replace."""
    from normcli.files import atomic_write  # the one atomic writer

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
) -> Manifest:
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


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check FOLDER/manifest.json: NormcliError if missing, malformed or foreign."""
    path = Path(folder) / MANIFEST_NAME
    text = _read_manifest(path, folder)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NormcliError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except RecursionError:
        raise NormcliError(f"{path} is not a normcli sweep manifest: nested too deeply") from None
    problem = _manifest_problem(data)
    if problem:
        raise NormcliError(f"{path} is not a normcli sweep manifest: {problem}")
    return data


def _read_manifest(path: Path, folder: str | os.PathLike) -> str:
    """The manifest's text; only a regular file of a sane size is read (a FIFO would block
    the read forever, a device never end it)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise NormcliError(f"{path} is not a regular file; a sweep manifest is one")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise NormcliError(f"{path}: {info.st_size} bytes, too large for a sweep manifest")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NormcliError(f"{path} not found: {folder} is not a sweep folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NormcliError(f"cannot read {path}: {exc}") from None


def _manifest_problem(data: Any) -> str | None:
    """What is wrong with a parsed manifest, or None: its format, then the types (the one
    validator), then the values."""
    from normcli.schema import check_type

    if not isinstance(data, dict):
        return "not a JSON object"
    if _depth(data) > MAX_DEPTH:  # what reads it recurses: refused before
        return f"nested more than {MAX_DEPTH} levels deep"
    if data.get("format") != MANIFEST_FORMAT:
        return f"format {data.get('format')!r}, this normcli reads format {MANIFEST_FORMAT}"
    problem = check_type(data, Manifest)
    if problem:
        return problem
    if not all(data["swept"].values()):
        return "'swept' must map option names to non-empty lists"
    if not _is_suffix(data["suffix"]):
        return "'suffix' must be a file suffix such as .safetensors"
    if not data["points"]:
        return "'points' must be a non-empty list"
    seen: set[str] = set()
    for i, entry in enumerate(data["points"]):
        problem = _point_problem(i, entry, seen)
        if problem:
            return problem
    return None


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in decoded JSON (without recursing)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:  # deeper is refused anyway: stop looking
                children = item.values() if isinstance(item, dict) else item
                stack += [(child, level + 1) for child in children]
    return deepest


def _is_file_name(value: str) -> bool:
    """A plain file name: not empty, no folder, not hidden."""
    return bool(value) and "/" not in value and value[0] != "."


def _point_problem(i: int, entry: PointEntry, seen: set[str]) -> str | None:
    """What is wrong with the values of well-typed point `i` (seen: names so far), or None."""
    name = entry["name"]
    if not _is_file_name(name):
        return f"point {i} has no valid name"
    if name in seen:
        return f"point {name} appears twice"
    seen.add(name)
    checks = (
        (entry["status"] in STATUSES, f"status must be one of {', '.join(STATUSES)}"),
        (entry["attempts"] >= 0, "'attempts' must be a whole number >= 0"),
        (_is_file_name(entry["output"]), "'output' must be a file name"),
    )
    for good, what in checks:
        if not good:
            return f"point {name}: {what}"
    return None


def update_point(
    folder: str | os.PathLike,
    manifest: Manifest,
    name: str,
    status: str,
    *,
    attempts: int | None = None,
    error: str | None = None,
    result: dict | None = None,
) -> PointEntry:
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


Identity = Callable[[Mapping[str, Any]], str]
Verify = Callable[[dict, Path], str | None]


def compare_manifest(
    manifest: Manifest,
    swept: Mapping[str, Sequence[Any]],
    fixed: Mapping[str, Any],
    *,
    extend: bool = False,
    where: str = "this folder",
    identity: Identity | None = None,
) -> str:
    """'resume' when the request has the manifest's points, 'extend' when it adds points (and
    `extend`); otherwise a NormcliError naming the differing fixed option or points. Points
    are the same when `identity` of their options is (default: the same options)."""
    if set(manifest["swept"]) != set(swept):
        raise NormcliError(
            f"the sweep in {where} sweeps {', '.join(manifest['swept'])}; "
            f"this request sweeps {', '.join(swept)}"
        )
    key = identity or _identity
    old = {key(e["options"]): e["name"] for e in manifest["points"]}
    new = {key(p.options): p.name for p in expand_grid(swept, fixed)}
    missing = [name for k, name in old.items() if k not in new]
    added = [name for k, name in new.items() if k not in old]
    if missing:
        # Other fixed options are the likelier cause; only now do they matter: fixed options
        # that differ in spelling only (a default spelled out) give the same points.
        _check_same_fixed(manifest["fixed"], _as_json(dict(fixed), "fixed options"), where)
        extra = f"; new: {names(added)}" if added else ""
        raise NormcliError(
            f"the sweep in {where} has runs this request lacks: {names(missing)}{extra} "
            "(repeat the old values, or use a new folder)"
        )
    if not added:
        return "resume"
    if not extend:
        raise NormcliError(
            f"this request adds {len(added)} runs to the sweep in {where} ({names(added)}); "
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


def open_sweep(
    folder: str | os.PathLike,
    swept: Mapping[str, Sequence[Any]],
    fixed: Mapping[str, Any],
    *,
    extend: bool = False,
    suffix: str = DEFAULT_SUFFIX,
    identity: Identity | None = None,
    verify: Verify | None = None,
) -> tuple[Manifest, str]:
    """Create, resume or extend the sweep in `folder`; returns (manifest, 'new'|'resume'|'extend').

    Extending keeps the old points' entries (status, attempts, results) and adds the new points
    as pending, in the new grid's order. `identity`: see `compare_manifest` (for normcli runs,
    `task.point_identity`). `verify(options, output)` checks every point's output file before
    anything is written (see `verify_outputs`; for normcli runs, `task.check_point_output`).
    """
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).exists():
        manifest, action = new_manifest(swept, fixed, suffix=suffix), "new"
    else:
        manifest = load_manifest(folder)
        action = compare_manifest(
            manifest, swept, fixed, extend=extend, where=str(folder), identity=identity
        )
    if action == "extend":
        key = identity or _identity
        old = {key(e["options"]): e for e in manifest["points"]}
        fresh = new_manifest(swept, fixed, suffix=manifest["suffix"])
        fresh["points"] = [old.get(key(e["options"]), e) for e in fresh["points"]]
        manifest = fresh
    again = verify_outputs(folder, manifest, verify) if verify else []
    if action != "resume" or again:
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder, manifest)
    return manifest, action


def verify_outputs(folder: str | os.PathLike, manifest: Manifest, verify: Verify) -> list[str]:
    """Check every point's output file in `folder` with `verify(options, path)`, which returns
    None for a finished output of that point and otherwise why not, or raises NormcliError for
    a file that must not be replaced. A done point whose output fails goes back to pending,
    the reason as its error (the manifest is not written); returns those points' names. An
    error names the point."""
    again = []
    for entry in manifest["points"]:
        try:
            problem = verify(entry["options"], Path(folder) / entry["output"])
        except NormcliError as e:
            raise NormcliError(f"point {entry['name']}: {e}") from None
        if problem and entry["status"] == "done":
            entry.update(status="pending", error=f"was done, but {problem}", result=None)
            again.append(entry["name"])
    return again


def manifest_points(manifest: Manifest, *, retry_failed: bool = True) -> list[Point]:
    """The points still to run: pending, interrupted ('running') and, if asked, failed ones."""
    skip = {"done"} if retry_failed else {"done", "failed"}
    return [Point(e["name"], e["options"]) for e in manifest["points"] if e["status"] not in skip]


def records(manifest: Manifest) -> list[dict]:
    """One record per finished point: its options merged with its result, for `aggregate`."""
    return [
        {**e["options"], **(e["result"] or {})} for e in manifest["points"] if e["status"] == "done"
    ]
