"""What was run: commands that reproduce the runs, the software and machines they trained on,
their seeds and training time, all read from the checkpoints' metadata."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from normcli.checkpoint import CheckpointMeta
from normcli.config import TYPED_OPTIONS, RunSpec, option_flags
from normcli.errors import NormcliError


def _list_text(value: Any) -> str:
    """One value of a sweep's comma list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def train_options(meta: CheckpointMeta) -> dict[str, Any]:
    """The fewest options that `normcli train` resolves to the run's own: those that differ
    from the defaults, and the thread count (it decides the floating-point sums)."""
    target = meta.run.options()
    given: dict[str, Any] = {"dataset": target["dataset"], "norm": target["norm"]}
    try:
        for _ in range(len(target)):  # each round adds one option; defaults depend on others
            resolved = RunSpec.from_options(**given).resolve().options()
            differ = [
                k for k in target
                if k in TYPED_OPTIONS and k not in given and resolved[k] != target[k]
            ]  # fmt: skip
            if not differ:
                break
            given[differ[0]] = target[differ[0]]
    except NormcliError:  # a run this normcli would not resolve: spell every option out
        given = {k: v for k, v in target.items() if k in TYPED_OPTIONS}
    given["threads"] = target["threads"]
    return given


def train_command(meta: CheckpointMeta, path: str | Path) -> str:
    """The shell command that trains this run again into `path`."""
    words = ["normcli", "train"]
    if meta.train_args.world_size > 1:
        words += ["--nproc", str(meta.train_args.world_size)]
    return shlex.join([*words, *option_flags(train_options(meta)), "--out", str(path)])


def sweep_command(manifest: dict, folder: str | Path) -> str:
    """The shell command that runs a sweep's grid again into `folder`."""
    words = ["normcli", "sweep"]
    for name, values in manifest["swept"].items():
        words += [f"--{name.replace('_', '-')}", ",".join(_list_text(v) for v in values)]
    for name, value in manifest["fixed"].items():
        if value is not None:
            words += [f"--{name.replace('_', '-')}", _list_text(value)]
    return shlex.join([*words, "--out", str(folder)])


def commands(paths: Sequence[Path], metas: Sequence[CheckpointMeta]) -> list[str]:
    """One sweep command per sweep folder the runs came from, one train command per other run."""
    from normcli.sweep.manifest import MANIFEST_NAME, load_manifest

    lines, swept = [], set()
    for folder in dict.fromkeys(p.parent for p in paths):
        if (folder / MANIFEST_NAME).is_file():
            try:
                manifest = load_manifest(folder)
            except NormcliError:
                continue  # not a manifest this normcli reads: train commands instead
            outputs = {folder / e["output"] for e in manifest["points"]}
            swept |= outputs
            lines.append(sweep_command(manifest, folder))
    for path, meta in zip(paths, metas, strict=True):
        if path not in swept:
            lines.append(train_command(meta, path))
    return lines


def _counted(values: Sequence[str]) -> str:
    """'a' when all runs agree, else 'a (2 runs), b (1 run)'."""
    counts = Counter(values)
    if len(counts) == 1:
        return values[0]
    return ", ".join(f"{v} ({n} run{'s' if n != 1 else ''})" for v, n in counts.items())


def machine_text(meta: CheckpointMeta) -> str:
    """'Intel Xeon (2 cores), cpu', or that the file does not say."""
    m = meta.machine
    if m is None:
        return "not recorded in the checkpoint"
    return f"{m['cpu']} ({m['cores']} cores), {m['device']}"


def environment(metas: Sequence[CheckpointMeta]) -> list[tuple[str, str]]:
    """(what, value) rows: versions, machines, threads, training time and save dates."""
    seconds = [sum(row["seconds"] for row in m.history) for m in metas]
    saved = sorted(m.created[:16].replace("T", " ") for m in metas)
    threads = [str(m.train_args.threads) if m.train_args.threads else "unknown" for m in metas]
    span = saved[0] if saved[0] == saved[-1] else f"{saved[0]} to {saved[-1]}"
    return [
        ("normcli", _counted([m.normcli_version for m in metas])),
        ("torch", _counted([m.torch_version for m in metas])),
        ("machine", _counted([machine_text(m) for m in metas])),
        ("CPU threads per run", _counted(threads)),
        ("training time", _training_time(seconds)),
        ("wall time", wall_time_text(metas)),
        ("last saved (UTC)", span),
    ]


def _moment(text: Any) -> datetime | None:
    """An ISO time from a file, or None where it is missing or not a time with a zone."""
    try:
        moment = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


def wall_seconds(metas: Sequence[CheckpointMeta]) -> tuple[float, int]:
    """(seconds during which at least one run was training, runs that say when they ran):
    the union of every run's interval from its first start to its last save, so that runs
    side by side count once and pauses between runs not at all."""
    spans = sorted(
        (start, end)
        for start, end in ((_moment(m.started), _moment(m.created)) for m in metas)
        if start is not None and end is not None and start <= end
    )
    total, reach = 0.0, None  # reach: the latest end counted so far
    for start, end in spans:
        reach = start if reach is None else max(reach, start)
        if end > reach:
            total += (end - reach).total_seconds()
            reach = end
    return total, len(spans)


def wall_time_text(metas: Sequence[CheckpointMeta]) -> str:
    """'1,234 s (20.6 min) while any run trained, ...', or why the files cannot say."""
    seconds, known = wall_seconds(metas)
    if known == 0:
        return "not recorded (the checkpoints predate the start time)"
    text = (f"{seconds:,.0f} s ({seconds / 60:.1f} min) while any run was training, from each "
            "run's start (data loaded, network built) to its last save; gaps between runs "
            "excluded")  # fmt: skip
    if known < len(metas):
        text += f"; {len(metas) - known} of {len(metas)} runs do not record when they started"
    return text


def _training_time(seconds: Sequence[float]) -> str:
    """Total and per-run training seconds, from the histories (evaluation excluded)."""
    total = sum(seconds)
    text = f"{total:,.0f} s in all ({total / 60:.1f} min)"
    if len(seconds) > 1:
        text += (f", {min(seconds):,.0f} to {max(seconds):,.0f} s per run; runs trained side by "
                 "side take less wall time than this sum")  # fmt: skip
    return text + "; from the epochs' training seconds, evaluation excluded"
