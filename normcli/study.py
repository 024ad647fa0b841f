"""Studies across runs: each checkpoint's final metrics as a record, and records reduced to one
row per group (e.g. norm, batch size) with n, mean, sample std, min, max over seeds and the
mean's 95% confidence interval (Student's t, `normcli.stats`).

Used by `eval --group-by` and study plots on any checkpoints, and on a sweep's results.
Only replicates are pooled: runs of one group that differ in an option other than the seed
(and the options that only change float rounding) land in separate rows, that option joining
the keys (`group_runs`); `select` keeps the runs that have given option values.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normcli.checkpoint import FINAL_METRICS, RunMetrics, read_metadata
from normcli.config import RUN_OPTIONS
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
    twice = [k for i, k in enumerate(group_by) if k in group_by[:i]]
    if twice:
        raise NormcliError(f"group key {twice[0]} is given twice")


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
    # Huge values (a diverged run's loss of 1e308 is finite) are scaled down first: their sum
    # and squares would overflow, and a float power raises OverflowError.
    scale = max(abs(v) for v in values)
    scale = scale if scale > _HUGE else 1.0
    scaled = [v / scale for v in values]
    mean = math.fsum(scaled) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in scaled) / (n - 1)) if n > 1 else None
    mean, std = mean * scale, None if std is None else std * scale
    interval = mean_interval(mean, std, n)
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values),
            "ci95": None if interval is None else list(interval)}  # fmt: skip


_HUGE = 1e150  # squares of values up to this stay finite


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
) -> Study:
    """`group_runs` over checkpoints: one row per group of `group_by` values (split further
    where the runs differ in other options), with n, mean, std, min, max of each metric
    (default: test accuracy and loss, validation accuracy if any)."""
    records = checkpoint_records(paths)
    if not metrics:
        metrics = ["test_accuracy", "test_loss"]
        if any("val_accuracy" in r for r in records):
            metrics.append("val_accuracy")
    return group_runs(records, group_by, metrics)


# ---------------------------------------------------------------------------------------------
# Pooling only what may be pooled, and choosing runs

# Options that change how a run computes, not what it computes: runs that differ only in them
# are replicates of one experiment. The seed is the replicate itself; threads and the memory
# layout change the order of float rounding only.
POOLED_OPTIONS = ("seed", "threads", "channels_last")
KEYS = (*RUN_OPTIONS, "label")  # what runs are grouped and chosen by


@dataclass
class Study:
    """Checkpoint records grouped for statistics over seeds."""

    rows: list[dict]  # aggregate's rows, grouped by `keys`
    keys: list[str]  # the keys asked for, then `split_by`
    split_by: list[str]  # options outside the asked keys on which runs of a group differed
    values: dict[str, list[Any]]  # the values of each option in `split_by`
    notes: list[str]  # what the user should know: runs left out of a metric

    def describe_split(self) -> str:
        """One line on the options that split the asked groups, '' if none did."""
        shown = ", ".join(
            f"{k} ({', '.join(show_value(v) for v in self.values[k])})" for k in self.split_by
        )
        if not shown:
            return ""
        asked = ", ".join(k for k in self.keys if k not in self.split_by)
        return f"runs with the same {asked} differ in {shown}: grouped by those too"

    def example(self) -> str:
        """A KEY=VALUE condition that keeps one value of the first splitting option."""
        key = self.split_by[0]
        return f"{key}={show_value(self.values[key][-1])}"


def group_runs(
    records: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str]
) -> Study:
    """`aggregate` that pools only replicates: runs with the same `group_by` values that
    differ in another option (other than POOLED_OPTIONS) fall in different rows, that option
    being added to the keys; runs without a metric are named in the notes."""
    unknown = [k for k in group_by if k not in KEYS]
    if unknown:
        raise NormcliError(f"unknown group key {unknown[0]}; available: {', '.join(KEYS)}")
    bad = [m for m in metrics if m not in FINAL_METRICS]
    if bad:
        raise NormcliError(f"unknown metric {bad[0]}; available: {', '.join(FINAL_METRICS)}")
    records, notes = _with_metrics(records, metrics)
    split = split_keys(records, group_by)
    keys = [*group_by, *split]
    values = {k: _distinct(r.get(k) for r in records) for k in split}
    return Study(aggregate(records, keys, metrics), keys, split, values, notes)


def _with_metrics(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str]
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The records of runs with a finished epoch, and notes on the runs left out of the
    statistics (of all metrics, or of one); a metric no run records is refused."""
    # A run without a finished epoch has no metrics; its `epochs` is the one it was set to
    # run, not the count it ran (see checkpoint_records): it takes no part in the grouping.
    empty = [r for r in records if r.get("test_loss") is None]
    notes = [f"no finished epoch in {_runs(empty)}: left out"] if empty else []
    records = [r for r in records if r.get("test_loss") is not None]
    if empty and not records:
        raise NormcliError(f"no finished epoch in any run ({_runs(empty)})")
    for metric in metrics:
        if records and not any(r.get(metric) is not None for r in records):
            raise NormcliError(f"no run records {metric}" + _why_missing(metric))
        lacking = [r for r in records if r.get(metric) is None]
        if lacking:
            notes.append(f"{metric} is not recorded by {_runs(lacking)}{_why_missing(metric)}: "
                         f"left out of its statistics")  # fmt: skip
    return records, notes


def split_keys(records: Sequence[Mapping[str, Any]], group_by: Sequence[str]) -> list[str]:
    """The run options, beyond `group_by`, needed so that runs of one group differ only in
    POOLED_OPTIONS: in option order, each one that still varies within a group (an option
    that follows from those before it, as the model from the dataset, is not added)."""
    keys = list(group_by)
    added = []
    for option in RUN_OPTIONS:
        if option in keys or option in POOLED_OPTIONS:
            continue
        seen: dict[str, str] = {}
        for record in records:
            group = _canonical([record.get(k) for k in keys])
            value = _canonical(record.get(option))
            if seen.setdefault(group, value) != value:
                keys.append(option)
                added.append(option)
                break
    return added


def _why_missing(metric: str) -> str:
    return " (trained without a validation split)" if metric.startswith("val_") else ""


def _runs(records: Sequence[Mapping[str, Any]], shown: int = 3) -> str:
    """'a.safetensors, b.safetensors (+2 more)': the runs' file names, or labels."""
    names = [Path(r["path"]).name if "path" in r else str(r.get("label")) for r in records]
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _distinct(values: Iterable[Any]) -> list[Any]:
    """The distinct values, sorted when they are all numbers, else in first-seen order."""
    unique = list({_canonical(v): v for v in values}.values())
    return sorted(unique) if all(_is_number(v) for v in unique) else unique


def show_value(value: Any) -> str:
    """An option value as users type it after KEY=: none, true, false, 0.05, bn."""
    if value is None:
        return "none"
    return json.dumps(value) if isinstance(value, bool) else str(value)


def parse_keys(text: str) -> list[str]:
    """'norm,batch_size' as a list of keys; an empty key (',' 'norm,') is refused."""
    keys = [k.strip() for k in text.split(",")]
    if not all(keys):
        raise NormcliError(f"group keys {text!r}: a key is empty; give KEY[,KEY...]")
    return keys


def parse_where(conditions: Sequence[str]) -> list[tuple[str, list[str]]]:
    """KEY=VALUE[,VALUE...] conditions as (key, values); the key must be a run option."""
    parsed = []
    for text in conditions:
        key, sep, values = (part.strip() for part in text.partition("="))
        if not sep or not key or not values:
            raise NormcliError(f"where condition {text!r} is not KEY=VALUE (e.g. epochs=15)")
        if key not in KEYS:
            raise NormcliError(f"where condition {text!r}: unknown key {key}; "
                               f"available: {', '.join(KEYS)}")  # fmt: skip
        parsed.append((key, [v.strip() for v in values.split(",")]))
    return parsed


def select(
    records: Sequence[Mapping[str, Any]], conditions: Sequence[str]
) -> list[Mapping[str, Any]]:
    """The records that meet every KEY=VALUE condition (KEY=A,B: either value); a condition
    that leaves no record is refused, with the values there are."""
    kept = list(records)
    for key, values in parse_where(conditions):
        there = _distinct(r.get(key) for r in kept)
        kept = [r for r in kept if any(matches(r.get(key), v) for v in values)]
        if not kept:
            raise NormcliError(
                f"no run has {key}={','.join(values)}; "
                f"{key} is {', '.join(show_value(v) for v in there)} there"
            )
    return kept


def select_runs(
    paths: Sequence[str | os.PathLike], conditions: Sequence[str]
) -> list[str | os.PathLike]:
    """The checkpoints that meet every KEY=VALUE condition (see `select`); all without any."""
    if not conditions:
        return list(paths)
    kept = {r["path"] for r in select(checkpoint_records(paths), conditions)}
    return [p for p in paths if str(p) in kept]


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def matches(value: Any, text: str) -> bool:
    """Whether an option's value is the one `text` spells (as typed: 15, 1e-4, true, none)."""
    word = text.lower()
    if value is None:
        return word in ("none", "null")
    if isinstance(value, bool):
        return word in (_TRUE if value else _FALSE)
    if isinstance(value, (int, float)):
        try:
            return float(text) == value
        except ValueError:
            return False
    return text == str(value)
