"""What every figure shares: metric names and axis labels, run styles, text as matplotlib
can draw it, and the limit beyond which a value is not drawn."""

from __future__ import annotations

import math

from matplotlib.axes import Axes

from normcli.checkpoint import FINAL_METRICS, HISTORY_KEYS

_SPLITS = {"train": "Train", "test": "Test", "val": "Validation"}


def _axis(name: str) -> tuple[str, str] | None:
    """(axis label with unit, title) of a metric named <split>_<loss|accuracy|error>."""
    split, _, kind = name.partition("_")
    if split not in _SPLITS:
        return None
    word = _SPLITS[split]
    units = {"loss": "loss (cross-entropy)", "accuracy": "accuracy (%)",
             "error": f"{word.lower()} error (%)"}  # fmt: skip
    return (units[kind], f"{word} {kind}") if kind in units else None


# metric -> (axis label with unit, title), for the history's keys and a run's final metrics
# (declared once, in checkpoint.EpochRecord and checkpoint.RunMetrics).
# The report adds the train-test gap of every epoch.
METRICS: dict[str, tuple[str, str]] = {"lr": ("learning rate", "Learning rate")} | {
    name: axis for name in (*HISTORY_KEYS, *FINAL_METRICS) if (axis := _axis(name))
} | {"train_test_gap": ("train − test accuracy (points)", "Train–test accuracy gap")}
DEFAULT_GRID = ("test_loss", "test_accuracy", "train_loss", "train_accuracy")
# Metrics whose plateau is where runs differ: their axes zoom on the last half of the epochs.
ZOOMED = frozenset({m for m in METRICS if m.endswith("accuracy")} | {"train_test_gap"})
DPI = 100
CELL_WIDTH, CELL_HEIGHT, TITLE_HEIGHT = 1.6, 1.9, 0.9  # inches, for misclassified grids


def shown(text: str) -> str:
    """`text` as matplotlib can draw it: lone surrogates (a file name's undecodable bytes,
    or JSON's \\udXXX escapes), which its text engine refuses, become U+FFFD."""
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def run_style(i: int) -> tuple[str, str]:
    """Marker and line style of the i-th run: no two of the first 32 runs share both."""
    return MARKERS[i % len(MARKERS)], LINESTYLES[(i + i // len(MARKERS)) % len(LINESTYLES)]


# Values farther from zero are not drawn: matplotlib's limits and ticks overflow near the
# largest float (a diverged run's loss of 1e308 is finite, and valid in a history).
DRAWABLE = 1e300


def drawable(value: float) -> float:
    """`value`, or NaN (a gap in the line) when it lies beyond ±DRAWABLE."""
    return value if abs(value) <= DRAWABLE else math.nan


def note(ax: Axes, text: str, top: bool = False) -> None:
    """A small grey note in a corner of the axes (bottom left, or top left)."""
    ax.text(
        0.01, 0.99 if top else 0.01, text, transform=ax.transAxes, fontsize=7, color="0.4",
        va="top" if top else "bottom",
    )  # fmt: skip
