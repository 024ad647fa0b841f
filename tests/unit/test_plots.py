"""Figures of normcli.plots read back from the matplotlib objects: mean ± std bands, study
plots over a categorical option, log loss axes, the zoom note, the confusion colour scale."""

from __future__ import annotations

import statistics

import pytest
from matplotlib.colors import LogNorm

from normcli import plots
from normcli.study import aggregate


def _run(final: float, seed: int, epochs: int = 8) -> list[dict]:
    return [{"epoch": e, "test_accuracy": final - 10.0 / e**2 + 0.1 * seed,
             "test_loss": 1.0 / e + 0.01 * seed, "train_loss": 2.0 / e**3,
             "train_accuracy": final - 9.0 / e} for e in range(1, epochs + 1)]  # fmt: skip


def test_band_figure_draws_the_mean_and_a_std_band_per_group() -> None:
    records = [{"norm": n, "seed": s, **row} for n, final in (("bn", 99.0), ("gn", 99.3))
               for s in (1, 2, 3) for row in _run(final, s)]  # fmt: skip
    rows = aggregate(records, ["norm", "epoch"], list(plots.DEFAULT_GRID))
    groups = [(n, [r for r in rows if r["norm"] == n]) for n in ("bn", "gn")]
    fig = plots.band_figure(groups, plots.DEFAULT_GRID, "t", log=["train_loss"])
    by_title = {ax.get_title(): ax for ax in fig.axes}
    ax = by_title["Test accuracy"]
    (bn, gn) = ax.get_lines()
    assert bn.get_label() == "bn (n=3)" and gn.get_label() == "gn (n=3)"
    for e in range(1, 9):
        values = [r["test_accuracy"] for r in records if r["norm"] == "bn" and r["epoch"] == e]
        assert bn.get_ydata()[e - 1] == pytest.approx(statistics.mean(values))
    band = ax.collections[0].get_paths()[0].vertices
    sd = statistics.stdev([r["test_accuracy"] for r in records
                           if r["norm"] == "bn" and r["epoch"] == 8])  # fmt: skip
    top = max(y for x, y in band if x == 8)
    assert top == pytest.approx(bn.get_ydata()[-1] + sd)
    assert by_title["Train loss"].get_yscale() == "log"
    assert by_title["Test loss"].get_yscale() == "linear"


def test_the_zoom_note_sits_under_the_axis_at_a_legible_size() -> None:
    fig = plots.curves_figure([("a", _run(99.0, 1)), ("b", _run(99.2, 1))], ["test_accuracy"])
    (ax,) = fig.axes
    first, note = ax.get_xlabel().split("\n")
    assert first == "epoch" and "zoomed on the last half" in note
    assert ax.xaxis.label.get_fontsize() >= 9
    assert not any("zoomed" in t.get_text() for t in ax.texts)  # nothing drawn over the data


def test_curves_take_a_log_axis_for_a_loss() -> None:
    fig = plots.curves_figure([("a", _run(99.0, 1))], ["train_loss", "test_accuracy"],
                              log=["train_loss"])  # fmt: skip
    loss, acc = fig.axes
    assert loss.get_yscale() == "log" and acc.get_yscale() == "linear"
    assert "zoomed" in acc.get_xlabel() and "zoomed" not in loss.get_xlabel()
    label = loss.yaxis.get_minor_formatter()
    values = (0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.3, 1.0)
    assert [label(v, 0) for v in values] == ["0.02", "", "0.05", "", "0.1", "0.2", "", "1"]


def test_a_categorical_option_gets_points_side_by_side_not_a_line() -> None:
    records = [{"norm": n, "ws": w, "seed": s, "test_accuracy": a + s / 10}
               for n, w, a in (("bn", False, 99.0), ("gn", True, 99.2), ("ln", True, 99.1),
                               ("gn", False, 98.8))
               for s in (1, 2)]  # fmt: skip
    rows = aggregate(records, ["ws", "norm"], ["test_accuracy"])
    fig = plots.study_figure(rows, records, "norm", "test_accuracy", "ws")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bn", "gn", "ln"]
    series = {c.get_label(): c for c in ax.containers}
    assert set(series) == {"ws=false", "ws=true"}
    for container in series.values():
        assert container.lines[0].get_linestyle() == "None"  # points only
    xs = list(series["ws=false"].lines[0].get_xdata())
    ys = list(series["ws=false"].lines[0].get_ydata())
    assert xs == pytest.approx([-0.06, 0.94]) and ys == pytest.approx([99.15, 98.95])
    assert list(series["ws=true"].lines[0].get_xdata()) == pytest.approx([1.06, 2.06])


def test_confusion_colours_are_on_a_log_scale_with_empty_cells_blank() -> None:
    confusion = [[980, 2, 0], [1, 1100, 0], [0, 30, 990]]
    fig = plots.confusion_figure(confusion, ["a", "b", "c"], "t")
    image = fig.axes[0].get_images()[0]
    assert isinstance(image.norm, LogNorm) and image.norm.vmin == 1
    data = image.get_array()
    assert data.mask[0][2] and not data.mask[0][1]  # 0 is masked, 2 gets a colour
    assert [t.get_text() for t in fig.axes[0].texts][:3] == ["980", "2", "0"]
