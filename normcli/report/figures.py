"""The report's figures, drawn by normcli.plots and kept as SVG text (no files, no requests):
the HTML page embeds them as data URIs, the Markdown twin writes them beside itself."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from normcli.report.groups import members

# Text stays text (smaller files, selectable); ids and the file are the same on every run,
# so a regenerated report differs only where its numbers do.
SVG_SETTINGS = {"svg.fonttype": "none", "svg.hashsalt": "normcli-report"}
CURVES = ("test_loss", "test_accuracy", "train_loss", "train_accuracy")


@dataclass
class ReportFigure:
    """One figure: a file-safe name, a title, a caption and the SVG document."""

    name: str
    title: str
    caption: str
    svg: str

    @property
    def data_uri(self) -> str:
        return "data:image/svg+xml;base64," + base64.b64encode(self.svg.encode()).decode()


def to_svg(fig: Figure) -> str:
    """The figure as an SVG document."""
    from normcli.plots import DPI

    buffer = io.BytesIO()
    with matplotlib.rc_context(SVG_SETTINGS):
        fig.savefig(buffer, format="svg", dpi=DPI, metadata={"Date": None})
    return buffer.getvalue().decode()


def _history_rows(paths: Sequence[Path], keys: Sequence[str], metrics: Sequence[str]) -> list:
    """`aggregate` over every run's epochs, by the group keys and the epoch."""
    from normcli.history import history_records
    from normcli.study import aggregate

    records = history_records(paths)
    for record in records:
        record["train_test_gap"] = record["train_accuracy"] - record["test_accuracy"]
    # In the history records the peak learning rate is `peak_lr`: `lr` is the epoch's rate.
    hkeys = ["peak_lr" if k == "lr" else k for k in keys]
    rows = aggregate(records, [*hkeys, "epoch"], list(metrics))
    return [{("lr" if k == "peak_lr" else k): v for k, v in row.items()} for row in rows]


def _by_group(history: list, rows: Sequence[dict], keys: Sequence[str]) -> list[list]:
    """The epoch rows of each group, in the groups' order."""
    return [[h for h in history if all(h[k] == row[k] for k in keys)] for row in rows]


def curve_figures(
    paths: Sequence[Path], rows: Sequence[dict], names: Sequence[str], keys: Sequence[str],
    title: str,
) -> list[ReportFigure]:  # fmt: skip
    """The training curves and the train–test gap per epoch, mean over seeds ± std."""
    from normcli.plots import band_figure

    history = _history_rows(paths, keys, [*CURVES, "train_test_gap"])
    groups = list(zip(names, _by_group(history, rows, keys), strict=True))
    curves = band_figure(groups, CURVES, title, log=["train_loss"])
    gap = band_figure(groups, ["train_test_gap"], title)
    return [
        ReportFigure("curves", "Training curves", "Each line is a group's mean over its runs at "
                     "every epoch, the band ±1 standard deviation. Train loss on a log axis; "
                     "train accuracy is measured on augmented images while the epoch trains.",
                     to_svg(curves)),
        ReportFigure("gap", "Train–test gap per epoch", "Train accuracy minus test accuracy "
                     "(percentage points), mean ± std over each group's runs. A gap that grows "
                     "while test accuracy stalls is overfitting; a negative gap means the "
                     "augmented training images are harder than the test set.", to_svg(gap)),
    ]  # fmt: skip


def study_plot(
    rows: Sequence[dict], records: Sequence[dict], keys: Sequence[str], title: str
) -> ReportFigure | None:
    """Final test accuracy against the last key (one line or set of points per value of the
    first key), each run a faint point; None without keys."""
    from normcli.plots import study_figure

    if not keys:
        return None
    x, hue = keys[-1], (keys[0] if len(keys) > 1 else None)
    fig = study_figure(rows, records, x, "test_accuracy", hue, title)
    caption = (f"Final test accuracy by {x}" + (f", one series per {hue}" if hue else "")
               + ": mean ± std over seeds, each run a faint point.")  # fmt: skip
    return ReportFigure("test_accuracy", "Final test accuracy", caption, to_svg(fig))


def evaluated_figures(
    rows: Sequence[dict], records: Sequence[dict], names: Sequence[str], keys: Sequence[str],
    evaluation: Callable[[list[str]], tuple[list[list[int]], list[str], Figure]],
) -> tuple[list[ReportFigure], list[ReportFigure]]:  # fmt: skip
    """Per group: the confusion matrix summed over its runs, and the misclassified grid of
    its first run. `evaluation(paths)` returns (summed confusion, class names, grid)."""
    from normcli.plots import confusion_figure

    confusions, grids = [], []
    for i, (row, name) in enumerate(zip(rows, names, strict=True)):
        paths = [r["path"] for r in members(row, records, keys)]
        confusion, classes, grid = evaluation(paths)
        total = sum(map(sum, confusion))
        runs = f"{len(paths)} run{'s' if len(paths) != 1 else ''}"
        fig = confusion_figure(confusion, classes, f"{name}: {total:,} predictions ({runs})")
        confusions.append(ReportFigure(
            f"confusion_{i + 1}", f"Confusion: {name}",
            f"Rows: true class, columns: predicted; summed over the group's {runs}. Log colour "
            "scale, so that single errors show; empty cells are white.", to_svg(fig),
        ))  # fmt: skip
        grids.append(ReportFigure(
            f"misclassified_{i + 1}", f"Misclassified: {name}",
            f"The most confidently wrong test images of {Path(paths[0]).stem}, with the "
            "predicted probability.", to_svg(grid),
        ))  # fmt: skip
    return confusions, grids
