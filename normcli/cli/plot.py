"""`normcli plot`: training curves of runs, or a study plot of a final metric over runs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from normcli.checkpoint import HISTORY_KEYS
from normcli.cli.options import CkptsArg, OverwriteOpt, WhereOpt
from normcli.cli.printing import warn, warn_study
from normcli.errors import NormcliError

# The per-epoch metrics a curve can show: the history's keys (declared once, in
# checkpoint.EpochRecord), less the epoch number and the timings.
Metric = Enum(
    "Metric",
    {k: k for k in HISTORY_KEYS if k not in ("epoch", "seconds", "images_per_second")},
    type=str,
)


LogOpt = Annotated[
    list[Metric] | None,
    typer.Option(
        "--log", help="Log-scale y axis for this metric (repeatable), e.g. --log train_loss.",
        show_default=False,
    ),
]
XOpt = Annotated[
    str | None,
    typer.Option(
        help="Study plot: run option on the x axis (e.g. batch_size).", show_default=False
    ),
]
YOpt = Annotated[
    str | None,
    typer.Option(
        help="Study plot: final metric (test_accuracy, test_error, ...). Default: test_accuracy.",
        show_default=False,
    ),
]
HueOpt = Annotated[
    str | None,
    typer.Option(help="Study plot: one line per value of this option.", show_default=False),
]


class Format(str, Enum):
    png = "png"
    svg = "svg"
    pdf = "pdf"


def plot(
    checkpoints: CkptsArg,
    metric: Annotated[
        list[Metric] | None,
        typer.Option(
            help="One figure per metric (repeatable). Default: a 2x2 figure of "
            "test/train loss/accuracy.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Figure path (.png/.svg/.pdf), or a folder (ending in /, or for several "
            "figures; created if missing). Default: beside the first checkpoint.",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format", help="Image format. Default: from --out, else png.", show_default=False
        ),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Figure title.", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    log: LogOpt = None,
    x: XOpt = None,
    y: YOpt = None,
    hue: HueOpt = None,
    where: WhereOpt = None,
) -> None:
    """Training curves of several runs on the same axes, from their stored histories; with
    --x, a study plot: a final metric against a run option, mean ± std over seeds."""
    from normcli.checkpoint import find_checkpoints, read_metadata
    from normcli.study import select_runs

    _check_plot_kind(x, y, hue, metric)
    checkpoints = select_runs(find_checkpoints(checkpoints), where or [])
    metas = [read_metadata(p) for p in checkpoints]
    if x is not None:
        _study_plot(checkpoints, metas, x, y or "test_accuracy", hue, out, fmt, title, overwrite)
        return
    _curves_plot(checkpoints, metas, metric, out, fmt, title, overwrite,
                 [m.value for m in log or ()])  # fmt: skip


def _check_plot_kind(x: str | None, y: str | None, hue: str | None, metric: list | None) -> None:
    """Curves or a study plot: refuse the options of the other kind."""
    if x is None and (y or hue):
        raise NormcliError(f"{'--y' if y else '--hue'} is for a study plot: give --x too")
    if x is not None and metric:
        raise NormcliError("--metric draws training curves; a study plot (--x) draws --y")


def _curves_plot(
    checkpoints: list[Path], metas: list, metric: list | None, out: Path | None,
    fmt: Format | None, title: str | None, overwrite: bool, log: list[str],
) -> None:  # fmt: skip
    from normcli.plots import (
        DEFAULT_GRID,
        curves_figure,
        default_title,
        mixed_datasets_warning,
        run_labels,
        save_figure,
    )

    figures = [[m.value] for m in metric] if metric else [list(DEFAULT_GRID)]
    _check_recorded({m for f in figures for m in f}, metas)
    names = ["curves" if len(f) > 1 else f[0] for f in figures]
    plan, formats = _figure_outputs(checkpoints[0].parent, names, out, fmt, overwrite)
    runs = list(zip(run_labels(metas, checkpoints), [m.history for m in metas], strict=True))
    heading = title or default_title(metas)
    if warning := mixed_datasets_warning(metas):
        warn(warning)
    with plan.claim() as paths:
        for metrics, path, image in zip(figures, paths, formats, strict=True):
            save_figure(curves_figure(runs, metrics, heading, log), path, image)
            print(path)


def _figure_outputs(
    folder: Path, names: list[str], out: Path | None, fmt: Format | None, overwrite: bool
) -> tuple[Any, list[str]]:
    """The checked output plan for figures NAMES (default: in FOLDER) and each one's format."""
    from normcli.outputs import image_format, plan_outputs

    suffix = fmt.value if fmt else "png"
    plan = plan_outputs(out, [folder / f"{n}.{suffix}" for n in names], overwrite)
    formats = [image_format(p) or suffix for p in plan]
    if fmt and formats[0] != fmt.value:
        raise NormcliError(f"--out {out} names a {formats[0]} file, but --format is {fmt.value}")
    return plan, formats


def _check_recorded(metrics: set[str], metas: list) -> None:
    for name in sorted(metrics):
        if not any(name in row for meta in metas for row in meta.history):
            raise NormcliError(f"--metric {name}: no run records it (val_*: train with --val)")


def _study_plot(
    checkpoints: list[Path], metas: list, x: str, y: str, hue: str | None,
    out: Path | None, fmt: Format | None, title: str | None, overwrite: bool,
) -> None:  # fmt: skip
    from normcli.outputs import image_format, plan_outputs
    from normcli.plots import default_title, save_figure, study_figure
    from normcli.study import checkpoint_records, group_runs

    suffix = fmt.value if fmt else "png"
    default = checkpoints[0].parent / f"{y}_by_{x}{f'_{hue}' if hue else ''}.{suffix}"
    plan = plan_outputs(out, [default], overwrite)
    image = image_format(plan.paths[0]) or suffix
    records = checkpoint_records(checkpoints)
    study = group_runs(records, [hue, x] if hue else [x], [y])
    warn_study(study)
    hues = [k for k in study.keys if k != x]  # one line per value of hue and of each split
    fig = study_figure(study.rows, records, x, y, hues, title or default_title(metas))
    with plan.claim() as [path]:
        save_figure(fig, path, image)
        print(path)
