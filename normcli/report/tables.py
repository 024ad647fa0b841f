"""The report's tables: cells of text (with the exact numbers behind them, for scripts and
tests), built from `study.aggregate` rows; and the sentences that read the differences."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from normcli.stats import Difference, welch_difference

# Metric -> (column title, decimals). Accuracies in percent, losses in nats.
COLUMNS = {
    "test_accuracy": ("test accuracy (%)", 2),
    "test_loss": ("test loss", 4),
    "val_accuracy": ("validation accuracy (%)", 2),
    "train_accuracy": ("final train accuracy (%)", 2),
    "train_test_gap": ("train − test accuracy (points)", 2),
    "loss_gap": ("test − train loss", 4),
}
COMPARED = "test_accuracy"  # the metric the pairwise differences read


@dataclass
class Cell:
    """One table cell: its text, and the numbers it shows (data-* attributes in HTML)."""

    text: str
    data: dict[str, float] = field(default_factory=dict)
    numeric: bool = False


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    keys: list[dict[str, Any]] = field(default_factory=list)  # each row's group key values


def cell(value: Any) -> Cell:
    """A value as shown: integers with thousands separators, options as typed (true, -)."""
    if isinstance(value, Cell):
        return value
    if isinstance(value, bool):
        return Cell("true" if value else "false")
    if isinstance(value, int):
        return Cell(f"{value:,}", numeric=True)
    if isinstance(value, float):
        return Cell(f"{value:g}", numeric=True)
    return Cell("-" if value is None else str(value))


def number(value: float, digits: int) -> Cell:
    """A number with `digits` decimals (the exact value as data)."""
    return Cell(f"{value:.{digits}f}", {"value": value}, numeric=True)


def mean_std(stats: dict | None, digits: int) -> Cell:
    """'99.46 ± 0.05' (one run: '99.46'), with the mean and std as data."""
    if not stats or not stats["n"]:
        return Cell("-", numeric=True)
    data = {"mean": stats["mean"]}
    text = f"{stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        data["std"] = stats["std"]
        text += f" ± {stats['std']:.{digits}f}"
    return Cell(text, data, numeric=True)


def interval(stats: dict | None, digits: int) -> Cell:
    """'[99.31, 99.60]', the mean's 95% interval; '-' below two runs."""
    if not stats or not stats.get("ci95"):
        return Cell("-", numeric=True)
    low, high = stats["ci95"]
    return Cell(f"[{low:.{digits}f}, {high:.{digits}f}]", {"low": low, "high": high}, True)


def comparison_table(
    rows: Sequence[dict], names: Sequence[str], keys: Sequence[str], metrics: Sequence[str]
) -> Table:
    """Per group: its key values, name, n, and per metric mean ± std and 95% interval."""
    columns = [*keys, "group", "n"]
    for metric in metrics:
        title, _ = COLUMNS[metric]
        columns += [f"{title}, mean ± std", "95% CI"]
    cells = []
    for row, name in zip(rows, names, strict=True):
        n = max((row[m]["n"] for m in metrics if row.get(m)), default=0)
        line = [*(cell(row[k]) for k in keys), Cell(name), cell(n)]
        for metric in metrics:
            digits = COLUMNS[metric][1]
            line += [mean_std(row.get(metric), digits), interval(row.get(metric), digits)]
        cells.append(line)
    return Table(columns, cells, [{k: row[k] for k in keys} for row in rows])


def gap_table(rows: Sequence[dict], names: Sequence[str]) -> Table:
    """Per group: final train and test accuracy, their gap with its interval, the loss gap."""
    columns = ["group", "n", COLUMNS["train_accuracy"][0], COLUMNS["test_accuracy"][0],
               COLUMNS["train_test_gap"][0], "95% CI", COLUMNS["loss_gap"][0]]  # fmt: skip
    cells = [
        [Cell(name), cell(row["train_test_gap"]["n"]), mean_std(row["train_accuracy"], 2),
         mean_std(row["test_accuracy"], 2), mean_std(row["train_test_gap"], 2),
         interval(row["train_test_gap"], 2), mean_std(row["loss_gap"], 4)]
        for row, name in zip(rows, names, strict=True)
    ]  # fmt: skip
    return Table(columns, cells)


def simple_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A table of plain values."""
    return Table(list(columns), [[cell(v) for v in row] for row in rows])


def _ncell(d: Difference) -> str:
    return f"n = {d.n_a}" if d.n_a == d.n_b else f"n = {d.n_a} and {d.n_b}"


def difference_sentence(a: str, b: str, d: Difference) -> str:
    """What the difference of two groups' mean test accuracy says, in plain words."""
    if d.interval is None:
        return (
            f"{a} − {b} = {d.estimate:+.2f} points, but with one run in a group there is no "
            f"interval ({_ncell(d)}): train more seeds to tell."
        )
    low, high = d.interval
    if d.spans_zero:
        return (
            f"{a} vs {b}: no difference at {_ncell(d)} ({a} − {b} = {d.estimate:+.2f} "
            f"points, 95% CI {low:+.2f} to {high:+.2f})."
        )
    if d.estimate > 0:
        return (f"{a} is higher than {b} by {d.estimate:.2f} points "
                f"(95% CI {low:.2f} to {high:.2f}, {_ncell(d)}).")  # fmt: skip
    return (f"{b} is higher than {a} by {-d.estimate:.2f} points "
            f"(95% CI {-high:.2f} to {-low:.2f}, {_ncell(d)}).")  # fmt: skip


def differences_table(rows: Sequence[dict], names: Sequence[str], keys: Sequence[str]) -> Table:
    """Welch differences of mean test accuracy between groups that differ only in the first
    key (every pair of norms, at each value of the other keys), with a sentence each."""
    columns = ["compared", "difference (points)", "95% CI (Welch)", "reading"]
    cells = []
    named = list(zip(rows, names, strict=True))
    for (ra, a), (rb, b) in itertools.combinations(named, 2):
        if any(ra[k] != rb[k] for k in keys[1:]):
            continue
        d = welch_difference(ra[COMPARED], rb[COMPARED]) if ra[COMPARED] else None
        if d is None:
            continue
        ci = Cell("-", numeric=True)
        if d.interval is not None:
            ci = Cell(f"[{d.interval[0]:+.2f}, {d.interval[1]:+.2f}]",
                      {"low": d.interval[0], "high": d.interval[1]}, True)  # fmt: skip
        cells.append([Cell(f"{a} − {b}"), Cell(f"{d.estimate:+.2f}", {"mean": d.estimate}, True),
                      ci, Cell(difference_sentence(a, b, d))])  # fmt: skip
    return Table(columns, cells)
