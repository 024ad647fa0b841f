"""Matplotlib figures: training curves (per run, or a group's mean over seeds with a ±std
band), misclassified-image grids, confusion heatmaps, study plots.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state)
and saved atomically. Import this module lazily: matplotlib is slow to load.
Text from files and arguments (titles, run labels, class names) is set with
parse_math=False: a '$' in it is a dollar sign, never the start of mathtext.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from normcli.checkpoint import Checkpoint, CheckpointMeta
from normcli.data import Split, denormalize, get_dataset, normalize
from normcli.evaluate import EVAL_BATCH_SIZE, Mistake, find_misclassified, predict
from normcli.files import atomic_write
from normcli.plots.study import LOG2_OPTIONS, study_figure
from normcli.plots.style import (
    CELL_HEIGHT,
    CELL_WIDTH,
    DEFAULT_GRID,
    DPI,
    DRAWABLE,
    METRICS,
    TITLE_HEIGHT,
    ZOOMED,
    drawable,
    note,
    run_style,
    shown,
)

__all__ = [
    "CELL_HEIGHT",
    "CELL_WIDTH",
    "DEFAULT_GRID",
    "DPI",
    "DRAWABLE",
    "LOG2_OPTIONS",
    "METRICS",
    "TITLE_HEIGHT",
    "ZOOMED",
    "band_figure",
    "confusion_figure",
    "curves_figure",
    "default_title",
    "drawable",
    "misclassified_figure",
    "misclassified_grid",
    "mixed_datasets_warning",
    "note",
    "run_labels",
    "run_style",
    "save_figure",
    "shown",
    "study_figure",
    "write_misclassified_grid",
    "zoom_on_last_half",
]


def save_figure(fig: Figure, path: Path, fmt: str | None = None) -> Path:
    """Save atomically in `fmt` (default: the path's suffix)."""
    fmt = (fmt or path.suffix.lstrip(".") or "png").lower()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
    return path


def _metric_axes(metrics: Sequence[str]) -> tuple[Figure, list[Axes]]:
    """A figure with one axes per metric (2 x 2 for four, else one row)."""
    n = len(metrics)
    rows, cols = (2, 2) if n == 4 else (1, n)
    fig = Figure(figsize=(6.4 * cols, 4.4 * rows), layout="constrained")
    return fig, list(fig.subplots(rows, cols, squeeze=False).flatten())


def _finish_axes(ax: Axes, metric: str, log: Sequence[str]) -> None:
    """Title, labels, integer epochs, grid, legend (labels as plain text), log scale if asked."""
    ylabel, name = METRICS.get(metric, (metric, metric))
    ax.set_title(name)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if metric in log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_log_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(_log_label))
    for text in ax.legend().get_texts():
        text.set_parse_math(False)  # run labels are file names: '$' is a dollar sign


def _log_label(value: float, _: object) -> str:
    """0.02, not 2 x 10^-2; only at 1, 2 and 5 times a power of ten, so labels never crowd."""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9) if value > 0 else 0
    return f"{value:g}" if round(mantissa, 6) in (1, 2, 5) else ""


def curves_figure(
    runs: Sequence[tuple[str, list[dict[str, float]]]],
    metrics: Sequence[str] = DEFAULT_GRID,
    title: str | None = None,
    log: Sequence[str] = (),
) -> Figure:
    """One axes per metric (2 x 2 for four), every run's history on the same axes; the
    metrics in `log` on a log y axis (a loss that falls by decades).

    Each run has its own colour, marker and line style, so runs whose curves coincide stay
    distinguishable. Accuracy axes are zoomed on the last half of the epochs (see
    `zoom_on_last_half`): that is where runs differ, by tenths of a percent.
    """
    fig, axes = _metric_axes(metrics)
    for ax, metric in zip(axes, metrics, strict=True):
        _draw_curves(ax, runs, metric)
        ax.set_xlabel("epoch")
        if metric in ZOOMED and metric not in log:
            with_metric = [[row for row in h if metric in row] for _, h in runs]
            zoom_on_last_half(ax, with_metric, metric)
        _finish_axes(ax, metric, log)
    if title:
        fig.suptitle(shown(title), parse_math=False)
    return fig


def band_figure(
    groups: Sequence[tuple[str, Sequence[dict]]],
    metrics: Sequence[str] = DEFAULT_GRID,
    title: str | None = None,
    log: Sequence[str] = (),
) -> Figure:
    """Like `curves_figure`, one line per group of runs: the mean over its runs at each epoch
    with a ±1 std band. A group's rows are `study.aggregate` rows over [..., "epoch"]: an
    "epoch" value and, per metric, its stats (n, mean, std)."""
    fig, axes = _metric_axes(metrics)
    for ax, metric in zip(axes, metrics, strict=True):
        spread = []  # per group: the means and the band's edges, for the zoom
        for i, (label, rows) in enumerate(groups):
            spread += _band(ax, i, label, rows, metric)
        ax.set_xlabel("epoch")
        if metric in ZOOMED and metric not in log:
            zoom_on_last_half(ax, spread, metric)
        _finish_axes(ax, metric, log)
    if title:
        fig.suptitle(title, parse_math=False)
    return fig


def _band(ax: Axes, i: int, label: str, rows: Sequence[dict], metric: str) -> list[list[dict]]:
    """One group's mean line and ±1 std band; returns the mean and the band's edges as
    histories (epoch and value rows)."""
    have = [r for r in rows if r.get(metric) and r[metric]["n"]]
    epochs = [int(r["epoch"]) for r in have]
    mean = [r[metric]["mean"] for r in have]
    std = [r[metric]["std"] or 0.0 for r in have]
    n = max((r[metric]["n"] for r in have), default=0)
    marker, linestyle = run_style(i)
    (line,) = ax.plot(epochs, mean, marker=marker, linestyle=linestyle, ms=4,
                      label=f"{label} (n={n})")  # fmt: skip
    low = [m - s for m, s in zip(mean, std, strict=True)]
    high = [m + s for m, s in zip(mean, std, strict=True)]
    ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return [[{"epoch": e, metric: v} for e, v in zip(epochs, edge, strict=True)]
            for edge in (mean, low, high)]  # fmt: skip


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
        note(ax, f"{left_out} value(s) beyond ±{DRAWABLE:g} left out", top=True)


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
        # Under the x label: legible at the label's size, and never over the data.
        ax.set_xlabel(
            f"{ax.get_xlabel()}\n(y axis zoomed on the last half of the epochs; "
            "earlier points lie outside it)"
        )


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
    """Heatmap of confusion[true][predicted] with counts in the cells, on a log colour scale:
    a linear one spends its shades on the diagonal and leaves the errors white."""
    k = len(class_names)
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k), layout="constrained")
    ax = fig.subplots()
    matrix = torch.tensor(confusion, dtype=torch.float)
    top = max(matrix.max().item(), 2.0)
    # Empty cells stay white (masked below the scale's 1); counts from 1 up get shades.
    cells = matrix.masked_fill(matrix < 1, float("nan")).numpy()
    im = ax.imshow(cells, cmap="Blues", norm=LogNorm(vmin=1, vmax=top))
    fig.colorbar(im, ax=ax, shrink=0.8, label="images (log scale)")
    names = [shown(n) for n in class_names]
    ax.set_xticks(range(k), names, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(range(k), names, parse_math=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = top**0.6  # where the log scale's blue gets dark enough for white text
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
    ckpt: Checkpoint, split: Split, path: Path, *, n: int = 10, sort: str = "index",
    cols: int = 5, batch_size: int = EVAL_BATCH_SIZE,
) -> list[Mistake]:  # fmt: skip
    """Find misclassified test images and save them as one annotated grid; returns them."""
    fig, mistakes = misclassified_grid(ckpt, split, n=n, sort=sort, cols=cols,
                                       batch_size=batch_size)  # fmt: skip
    save_figure(fig, path)
    return mistakes


def misclassified_grid(
    ckpt: Checkpoint, split: Split, *, n: int = 10, sort: str = "index", cols: int = 5,
    batch_size: int = EVAL_BATCH_SIZE,
) -> tuple[Figure, list[Mistake]]:  # fmt: skip
    """The annotated grid of a checkpoint's first (or most confident) misclassified test
    images, and those mistakes."""
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
    return fig, mistakes
