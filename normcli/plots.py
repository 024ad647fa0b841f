"""Matplotlib figures: training curves, misclassified-image grids, confusion heatmaps.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state)
and saved atomically. Import this module lazily: matplotlib is slow to load.
Text from files and arguments (titles, run labels, class names) is set with
parse_math=False: a '$' in it is a dollar sign, never the start of mathtext.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from normcli.checkpoint import FINAL_METRICS, HISTORY_KEYS, Checkpoint, CheckpointMeta
from normcli.data import Split, denormalize, get_dataset, normalize
from normcli.evaluate import EVAL_BATCH_SIZE, Mistake, find_misclassified, predict
from normcli.files import atomic_write

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
METRICS: dict[str, tuple[str, str]] = {"lr": ("learning rate", "Learning rate")} | {
    name: axis for name in (*HISTORY_KEYS, *FINAL_METRICS) if (axis := _axis(name))
}
DEFAULT_GRID = ("test_loss", "test_accuracy", "train_loss", "train_accuracy")
DPI = 100
CELL_WIDTH, CELL_HEIGHT, TITLE_HEIGHT = 1.6, 1.9, 0.9  # inches, for misclassified grids


def shown(text: str) -> str:
    """`text` as matplotlib can draw it: lone surrogates (a file name's undecodable bytes,
    or JSON's \\udXXX escapes), which its text engine refuses, become U+FFFD."""
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def save_figure(fig: Figure, path: Path, fmt: str | None = None) -> Path:
    """Save atomically in `fmt` (default: the path's suffix)."""
    fmt = (fmt or path.suffix.lstrip(".") or "png").lower()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
    return path


def curves_figure(
    runs: Sequence[tuple[str, list[dict[str, float]]]],
    metrics: Sequence[str] = DEFAULT_GRID,
    title: str | None = None,
) -> Figure:
    """One axes per metric (2 x 2 for four), every run's history on the same axes.

    Each run has its own colour, marker and line style, so runs whose curves coincide stay
    distinguishable. Accuracy axes are zoomed on the last half of the epochs (see
    `zoom_on_last_half`): that is where runs differ, by tenths of a percent.
    """
    n = len(metrics)
    rows, cols = (2, 2) if n == 4 else (1, n)
    fig = Figure(figsize=(6.4 * cols, 4.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, metric in zip(axes, metrics, strict=True):
        ylabel, name = METRICS[metric]
        _draw_curves(ax, runs, metric)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if metric.endswith("accuracy"):
            with_metric = [[row for row in h if metric in row] for _, h in runs]
            zoom_on_last_half(ax, with_metric, metric)
        for text in ax.legend().get_texts():
            text.set_parse_math(False)  # run labels are file names: '$' is a dollar sign
    if title:
        fig.suptitle(shown(title), parse_math=False)
    return fig


def _draw_curves(ax: Axes, runs: Sequence[tuple[str, list[dict[str, float]]]], metric: str) -> None:
    """Every run's curve of `metric` (runs without it are skipped: val_* needs --val), in the
    run's style; values too far out to draw leave a gap, and a note says how many."""
    left_out = 0
    for i, (label, full) in enumerate(runs):
        marker, linestyle = run_style(i)
        history = [row for row in full if metric in row]
        values = [drawable(row[metric]) for row in history]
        left_out += sum(math.isnan(v) for v in values)
        ax.plot(
            [int(row["epoch"]) for row in history], values,
            marker=marker, linestyle=linestyle, ms=4, label=shown(label),
        )  # fmt: skip
    if left_out:
        _note(ax, f"{left_out} value(s) beyond ±{DRAWABLE:g} left out", top=True)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def run_style(i: int) -> tuple[str, str]:
    """Marker and line style of the i-th run: no two of the first 32 runs share both."""
    return MARKERS[i % len(MARKERS)], LINESTYLES[(i + i // len(MARKERS)) % len(LINESTYLES)]


def zoom_on_last_half(ax: Axes, histories: Sequence[list[dict[str, float]]], metric: str) -> None:
    """Fit the y-axis to the last half of every run's epochs (the plateau, where runs at
    99.4% and 99.6% differ); earlier points outside it run off the axes, and a note says so."""
    tail = [row[metric] for h in histories for row in h[len(h) // 2 :]]
    tail = [v for v in tail if abs(v) <= DRAWABLE]
    if not tail:
        return
    pad = max((max(tail) - min(tail)) * 0.15, 0.05)
    low, high = min(tail) - pad, max(tail) + pad
    ax.set_ylim(low, high)
    if any(not low <= row[metric] <= high for h in histories for row in h):
        _note(ax, "zoomed on the last half of the epochs; earlier points lie outside")


# Values farther from zero are not drawn: matplotlib's limits and ticks overflow near the
# largest float (a diverged run's loss of 1e308 is finite, and valid in a history).
DRAWABLE = 1e300


def drawable(value: float) -> float:
    """`value`, or NaN (a gap in the line) when it lies beyond ±DRAWABLE."""
    return value if abs(value) <= DRAWABLE else math.nan


def _note(ax: Axes, text: str, top: bool = False) -> None:
    """A small grey note in a corner of the axes (bottom left, or top left)."""
    ax.text(
        0.01, 0.99 if top else 0.01, text, transform=ax.transAxes, fontsize=7, color="0.4",
        va="top" if top else "bottom",
    )  # fmt: skip


def mixed_datasets_warning(metas: Sequence[CheckpointMeta]) -> str | None:
    """A warning when runs of different datasets would share axes, else None."""
    datasets = sorted({m.dataset for m in metas})
    if len(datasets) < 2:
        return None
    return (
        f"plotting runs of different datasets together ({', '.join(datasets)}): "
        "their losses and accuracies are not comparable"
    )


def misclassified_figure(
    images: torch.Tensor,
    mistakes: Sequence[Mistake],
    class_names: Sequence[str],
    cols: int,
    title: str,
) -> Figure:
    """A grid with one titled cell per mistake; images are [0, 1] floats (N, C, H, W).

    Size in pixels at DPI 100: width cols * 160, height rows * 190 + 90.
    """
    rows = max(1, -(-len(mistakes) // cols))
    fig = Figure(figsize=(cols * CELL_WIDTH, rows * CELL_HEIGHT + TITLE_HEIGHT))
    top = 1 - TITLE_HEIGHT / (rows * CELL_HEIGHT + TITLE_HEIGHT)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=top, wspace=0.1, hspace=0.45)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, image, m in zip(axes, images, mistakes, strict=False):
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(
            shown(f"#{m.index}\ntrue: {class_names[m.true]}\npred: {class_names[m.predicted]} "
                  f"({m.probability:.2f})"),
            fontsize=8,
            parse_math=False,  # class names are data, never math
        )
    top = 1 - 0.15 / (rows * CELL_HEIGHT + TITLE_HEIGHT)
    fig.suptitle(shown(title), fontsize=10, y=top, parse_math=False)
    return fig


def confusion_figure(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str
) -> Figure:
    """Heatmap of confusion[true][predicted] with counts in the cells."""
    k = len(class_names)
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k), layout="constrained")
    ax = fig.subplots()
    matrix = torch.tensor(confusion, dtype=torch.float)
    im = ax.imshow(matrix.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images")
    names = [shown(n) for n in class_names]
    ax.set_xticks(range(k), names, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(range(k), names, parse_math=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = matrix.max().item() / 2
    for i in range(k):
        for j in range(k):
            value = int(matrix[i, j])
            color = "white" if value > threshold else "black"
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    ax.set_title(shown(title), parse_math=False)
    return fig


def run_labels(metas: Sequence[CheckpointMeta], paths: Sequence[Path]) -> list[str]:
    """Legend labels from metadata ('BN + L1 (1e-4)', 'GN (G=2)', 'LN'); file stem if ambiguous."""
    labels = [m.label for m in metas]
    return [
        f"{label} [{p.stem}]" if labels.count(label) > 1 else label
        for label, p in zip(labels, paths, strict=True)
    ]


def default_title(metas: Sequence[CheckpointMeta]) -> str:
    """'MNIST (mnist_net)' from the runs' datasets and models."""
    datasets = sorted({m.dataset.upper() for m in metas})
    models = sorted({m.model_args.model for m in metas})
    return f"{', '.join(datasets)} ({', '.join(models)})"


def write_misclassified_grid(
    ckpt: Checkpoint,
    split: Split,
    path: Path,
    *,
    n: int = 10,
    sort: str = "index",
    cols: int = 5,
    batch_size: int = EVAL_BATCH_SIZE,
) -> list[Mistake]:
    """Find misclassified test images and save them as one annotated grid; returns them."""
    meta, spec = ckpt.meta, get_dataset(ckpt.meta.dataset)
    device = split.images.device
    logits = predict(ckpt.model.to(device), split, spec, batch_size)
    mistakes = find_misclassified(logits, split.labels, n, sort)
    index = torch.tensor([m.index for m in mistakes], dtype=torch.long)
    # De-normalize the normalized input: the cells show exactly what the model saw.
    images = denormalize(normalize(split.images.cpu()[index], spec), spec)
    which = "first" if sort == "index" else "most confidently"
    title = (
        f"{meta.model_args.model} · {meta.label} · {meta.dataset.upper()}: "
        f"{which} misclassified test images"
    )
    fig = misclassified_figure(images, mistakes, meta.class_names, min(cols, n), title)
    save_figure(fig, path)
    return mistakes


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
    are not all numbers (limit: none, 500) is drawn as categories."""
    hues = [hue] if isinstance(hue, str) else list(hue or ())
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    where, numeric = _x_positions([r[x] for r in rows])

    def line_of(r: dict) -> str:
        return _key([r.get(k) for k in hues])

    for i, line in enumerate(dict.fromkeys(map(line_of, rows))):
        mine = [r for r in rows if line_of(r) == line]
        runs = [r for r in records if line_of(r) == line and y in r]
        label = ", ".join(f"{k}={_shown_value(mine[0][k])}" for k in hues) or y
        _study_line(ax, i, label, mine, runs, lambda r: where[_key(r.get(x))], y)
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
    ax.legend()


def _study_line(
    ax: Axes, i: int, label: str, rows: Sequence[dict], runs: Sequence[dict],
    at: Callable[[dict], float], y: str,
) -> None:  # fmt: skip
    """One group: its means with ±1 std error bars, and each run as a faint point (values
    beyond ±DRAWABLE are left out)."""
    have = [r for r in rows if r[y] and r[y]["n"] and abs(r[y]["mean"]) <= DRAWABLE]
    marker, linestyle = run_style(i)
    line = ax.errorbar(
        [at(r) for r in have], [r[y]["mean"] for r in have],
        yerr=[_error_bar(r[y]["std"]) for r in have],
        marker=marker, linestyle=linestyle, capsize=3, label=shown(label),
    )  # fmt: skip
    runs = [r for r in runs if abs(r[y]) <= DRAWABLE]
    ax.scatter([at(r) for r in runs], [r[y] for r in runs], s=10, alpha=0.3,
               color=line.lines[0].get_color())  # fmt: skip


def _error_bar(std: float | None) -> float:
    """The half-height of an error bar: the std, none for one run or a spread too wide to draw."""
    return std if std is not None and std <= DRAWABLE else 0.0
