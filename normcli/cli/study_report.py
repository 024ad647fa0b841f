"""`normcli report`: a study as one HTML page (normcli.report); prints the files written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normcli.cli.options import DataDirOpt, Device, DeviceOpt, LimitOpt, OverwriteOpt
from normcli.cli.printing import warn
from normcli.errors import NormcliError

REPORT_NAME = "report.html"

# The command's own options, declared apart so that its signature stays short.
StudyArg = Annotated[
    list[Path], typer.Argument(help="Checkpoints, or folders of them (a study, a sweep).")
]
PageOpt = Annotated[
    Path | None,
    typer.Option(
        help="The HTML page. Default: report.html in the first checkpoint's folder.",
        show_default=False,
    ),
]
MarkdownOpt = Annotated[
    bool,
    typer.Option(
        "--markdown",
        help="Also write the Markdown twin: <out>.md, its figures as SVG files in "
        "<out>_figures/ beside it.",
    ),
]
GroupByOpt = Annotated[
    str | None,
    typer.Option(
        help="KEY[,KEY]: run options that group the runs. Default: the fewest options "
        "that tell the settings apart (runs differing only in --seed are pooled).",
        show_default=False,
    ),
]
EvaluateOpt = Annotated[
    bool,
    typer.Option(
        "--eval/--no-eval",
        help="Evaluate every run on its test set for the confusion matrices and "
        "misclassified images (needs the data).",
    ),
]


def report(
    checkpoints: StudyArg,
    out: PageOpt = None,
    markdown: MarkdownOpt = False,
    group_by: GroupByOpt = None,
    evaluate: EvaluateOpt = True,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    device: DeviceOpt = Device.auto,
    overwrite: OverwriteOpt = False,
) -> None:
    """One self-contained HTML page of a study (what was run, mean ± std and 95% intervals
    per group, differences between groups, curves, confusion matrices, misclassified images,
    parameters); prints the files written."""
    from normcli.checkpoint import find_checkpoints
    from normcli.console import step_progress
    from normcli.report import build_report, write_report
    from normcli.report.render import check_outputs

    found = find_checkpoints(checkpoints)
    keys = None if group_by is None else [k.strip() for k in group_by.split(",") if k.strip()]
    if keys == []:
        raise NormcliError("--group-by needs at least one run option, e.g. norm")
    path = out if out is not None else found[0].parent / REPORT_NAME
    check_outputs(path, markdown, overwrite)  # before any work
    with step_progress("evaluating", len(found)) as advance:
        result = build_report(
            checkpoints, group_by=keys, evaluate=evaluate, data_dir=data_dir, limit=limit,
            device=device.value, progress=advance,
        )  # fmt: skip
    for note in result.notes:
        warn(note)
    for written in write_report(result, path, markdown=markdown, overwrite=overwrite):
        print(written)
