"""Studies across runs: each checkpoint's final metrics as a record, and records reduced to one
row per group (e.g. norm, batch size) with n, mean, sample std, min, max over seeds and the
mean's 95% confidence interval (Student's t, `normcli.stats`).

Used by `eval --group-by` and study plots on any checkpoints, and on a sweep's results.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from normcli.checkpoint import FINAL_METRICS, RunMetrics, read_metadata
from normcli.errors import NormcliError
from normcli.stats import mean_interval


def aggregate(
    records: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str]
) -> list[dict]:
    """One row per combination of the `group_by` values, with n, mean, std, min, max and ci95
    (the mean's 95% interval, [low, high]) per metric.

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
    """n, mean, sample std and the mean's 95% interval (t; both None below two values), min
    and max of a metric's values."""
    bad = next((v for v in values if not _is_number(v)), None)
    if bad is not None:
        raise NormcliError(f"metric {metric} has a value that is not a number: {bad!r}")
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    interval = mean_interval(mean, std, n)
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values),
            "ci95": None if interval is None else list(interval)}  # fmt: skip


# ---------------------------------------------------------------------------------------------


def final_metrics(history: Sequence[Mapping[str, float]]) -> RunMetrics:
    """The `RunMetrics` of a run with this history (empty for no epochs)."""
    if not history:
        return {}
    last = history[-1]
    totals = {"seconds": sum(row["seconds"] for row in history), "epochs": len(history)}
    out: dict[str, Any] = {}
    for name in FINAL_METRICS:
        if name in totals:
            out[name] = totals[name]
        elif name.endswith("_error"):
            accuracy = last.get(name.removesuffix("_error") + "_accuracy")
            if accuracy is not None:
                out[name] = 100.0 - accuracy
        elif name in last:
            out[name] = last[name]
    return out


def checkpoint_records(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """One record per checkpoint for `aggregate`: every run option, the run's label, and its
    final metrics (from the stored history: no re-evaluation)."""
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
