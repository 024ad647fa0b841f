"""Study plots: a final metric against a run option, the mean over seeds with error bars."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from normcli.plots.style import DRAWABLE, METRICS, run_style, shown

# Options whose values grow by factors of two: a log2 axis spaces them evenly (GN paper, Fig. 1).
LOG2_OPTIONS = frozenset({"batch_size", "groups", "world_size"})


def study_figure(
    rows: Sequence[dict],
    records: Sequence[dict],
    x: str,
    y: str,
    hue: str | Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """A final metric against a run option: one line per value of `hue` (one key or several)
    at the mean over seeds, ±1 std error bars, and each run as a faint point. `rows` come from
    study.aggregate over [*hue, x]; `records` are the runs themselves. An x option whose values
    are not all numbers (norm; limit: none, 500) is categorical: its values sit side by side as
    points with no line joining them, each line's points shifted a little so that their bars
    do not hide each other."""
    hues = [hue] if isinstance(hue, str) else list(hue or ())
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    where, numeric = _x_positions([r[x] for r in rows])

    def line_of(r: dict) -> str:
        return _key([r.get(k) for k in hues])

    lines = list(dict.fromkeys(map(line_of, rows)))
    for i, line in enumerate(lines):
        mine = [r for r in rows if line_of(r) == line]
        runs = [r for r in records if line_of(r) == line and y in r]
        label = ", ".join(f"{k}={_shown_value(mine[0][k])}" for k in hues) or y
        shift = 0.0 if numeric else 0.12 * (i - (len(lines) - 1) / 2)
        _study_line(ax, i, label, mine, runs, lambda r, s=shift: where[_key(r.get(x))] + s, y,
                    joined=numeric)  # fmt: skip
    _study_axes(ax, rows, x, y, title, where if not numeric else None)
    return fig


def _key(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _shown_value(value: object) -> str:
    """An option value in a legend or tick label: none, true, 0.05, bn."""
    return "none" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def _x_positions(values: Sequence[object]) -> tuple[dict[str, float], bool]:
    """Where each x value goes (by its JSON key), and whether the axis is numeric: the value
    itself when all are numbers, else 0, 1, 2, ... in the order given (categories)."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    distinct = {_key(v): v for v in values}
    if numeric:
        return dict(distinct), True  # type: ignore[arg-type]
    return {k: float(i) for i, k in enumerate(distinct)}, False


def _study_axes(
    ax: Axes, rows: Sequence[dict], x: str, y: str, title: str | None,
    categories: dict[str, float] | None,
) -> None:  # fmt: skip
    """Log2 x axis for options that double, the categories' names as ticks, labels, the
    title with the largest n, legend."""
    if categories is not None:
        names = {_key(r[x]): _shown_value(r[x]) for r in rows}
        ax.set_xticks(list(categories.values()), [shown(names[k]) for k in categories])
    elif x in LOG2_OPTIONS and all(r[x] > 0 for r in rows):
        ax.set_xscale("log", base=2)
        ticks = sorted({r[x] for r in rows})
        ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.set_xlabel(x)
    ax.set_ylabel(METRICS[y][0] if y in METRICS else y)
    n = max((r[y]["n"] for r in rows if r[y]), default=0)
    heading = (title + ": " if title else "") + f"{y} (mean ± std, up to n={n} per point)"
    ax.set_title(shown(heading), parse_math=False)
    ax.grid(alpha=0.3)
    if len(ax.containers) > 1:  # one series needs no legend
        for text in ax.legend().get_texts():
            text.set_parse_math(False)


def _study_line(
    ax: Axes, i: int, label: str, rows: Sequence[dict], runs: Sequence[dict],
    at: Callable[[dict], float], y: str, joined: bool = True,
) -> None:  # fmt: skip
    """One group: its means with ±1 std error bars (joined by a line on a numeric axis, not
    between categories), and each run as a faint point (values beyond ±DRAWABLE left out)."""
    have = [r for r in rows if r[y] and r[y]["n"] and abs(r[y]["mean"]) <= DRAWABLE]
    marker, linestyle = run_style(i)
    line = ax.errorbar(
        [at(r) for r in have], [r[y]["mean"] for r in have],
        yerr=[_error_bar(r[y]["std"]) for r in have],
        marker=marker, linestyle=linestyle if joined else "none", capsize=3,
        label=shown(label),
    )  # fmt: skip
    runs = [r for r in runs if abs(r[y]) <= DRAWABLE]
    ax.scatter([at(r) for r in runs], [r[y] for r in runs], s=10, alpha=0.3,
               color=line.lines[0].get_color())  # fmt: skip


def _error_bar(std: float | None) -> float:
    """The half-height of an error bar: the std, none for one run or a spread too wide to draw."""
    return std if std is not None and std <= DRAWABLE else 0.0
