"""Which runs a report pools: the options that differ between runs, the keys that group them,
and a readable name for each group.

Runs are replicates of one setting when every option but the seed is the same. By default the
groups are exactly those settings, keyed by the fewest options that tell them apart (a study
of three norms is grouped by `norm`, even though `groups`, `ws` and `l1` differ with it). Keys
given by the user may pool runs that differ in more than the seed: that is reported as a note,
never done silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from normcli.config import RUN_OPTIONS
from normcli.errors import NormcliError

REPLICATE = "seed"  # runs that differ only in this option are repeats of one setting
# Options the run label already names ('GN (G=2) + WS + L1 (1e-4)', '[2 procs x 8, sync]').
IN_LABEL = frozenset({"norm", "groups", "ws", "l1", "world_size", "sync_bn"})


def _value(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def varying_options(records: Sequence[dict]) -> list[str]:
    """The run options (in their declared order) whose values differ between runs."""
    return [
        key for key in RUN_OPTIONS
        if len({_value(r.get(key)) for r in records}) > 1
    ]  # fmt: skip


def partition(records: Sequence[dict], keys: Sequence[str]) -> list[tuple[int, ...]]:
    """The runs split by their values of `keys`: one tuple of record indices per group."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(_value([record.get(k) for k in keys]), []).append(i)
    return sorted(tuple(g) for g in groups.values())


def grouping_keys(records: Sequence[dict]) -> list[str]:
    """The fewest varying options (taken in declared order) that split the runs into the
    same groups as all of them but the seed."""
    settings = [k for k in varying_options(records) if k != REPLICATE]
    target = partition(records, settings)
    keys: list[str] = []
    for key in settings:
        if partition(records, keys) == target:
            break
        if partition(records, [*keys, key]) != partition(records, keys):
            keys.append(key)
    return keys


def check_keys(records: Sequence[dict], keys: Sequence[str]) -> None:
    """Refuse group keys that are not run options."""
    unknown = [k for k in keys if k not in RUN_OPTIONS]
    if unknown:
        raise NormcliError(
            f"unknown group key {', '.join(unknown)}; run options: {', '.join(RUN_OPTIONS)}"
        )


def pooled_settings(records: Sequence[dict], keys: Sequence[str]) -> dict[str, list[str]]:
    """Options other than the seed that differ within some group of `keys`, with the values
    pooled: {option: ['2', '4', ...]}; empty when every group holds one setting."""
    pooled: dict[str, list[str]] = {}
    for members in partition(records, keys):
        runs = [records[i] for i in members]
        for key in varying_options(runs):
            if key != REPLICATE:
                values = pooled.setdefault(key, [])
                values += [v for v in dict.fromkeys(str(r.get(key)) for r in runs)
                           if v not in values]  # fmt: skip
    return pooled


def group_names(rows: Sequence[dict], records: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """A name per aggregated row: its runs' label (e.g. 'GN (G=4) + WS') and the keys the
    label does not name ('GN (G=4) + WS, batch_size=8'); key=value pairs when the labels
    cannot tell the groups apart."""
    plain = [", ".join(f"{k}={row[k]}" for k in keys) or "all runs" for row in rows]
    names = []
    for row in rows:
        labels = {r["label"] for r in members(row, records, keys)}
        if len(labels) != 1:
            return plain
        rest = [f"{k}={row[k]}" for k in keys if k not in IN_LABEL]
        names.append(", ".join([labels.pop(), *rest]))
    return names if len(set(names)) == len(names) else plain


def members(row: dict, records: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """The records of one aggregated row's group."""
    return [r for r in records if all(_value(r.get(k)) == _value(row[k]) for k in keys)]
