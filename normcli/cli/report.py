"""The commands that report on checkpoints and models: eval, misclassified, history, summary."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from normcli.cli.options import (
    CkptsArg,
    DataDirOpt,
    Device,
    DeviceOpt,
    EvalBatchOpt,
    GroupsOpt,
    JsonOpt,
    LimitOpt,
    ModelOpt,
    Norm,
    NormOpt,
    OverwriteOpt,
    WhereOpt,
    WsOpt,
)
from normcli.cli.printing import print_json, warn, warn_study
from normcli.console import stderr
from normcli.errors import NormcliError
from normcli.evaluate import EVAL_BATCH_SIZE


class SortOrder(str, Enum):
    index = "index"
    confidence = "confidence"


def eval_(
    checkpoints: CkptsArg,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    batch_size: EvalBatchOpt = EVAL_BATCH_SIZE,
    device: DeviceOpt = Device.auto,
    confusion: Annotated[
        str | None,
        typer.Option(
            help="Write the confusion matrix heatmap to this .png/.svg/.pdf file, or into "
            "this folder (ending in /, or for several checkpoints; created if missing) as "
            "<checkpoint>_confusion.png.",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table on stdout.")] = False,
    group_by: Annotated[
        str | None,
        typer.Option(
            help="KEY[,KEY]: one row per group of runs (any run option, e.g. norm,batch_size) "
            "with n, mean ± std, min, max of the final metrics stored in the checkpoints.",
            show_default=False,
        ),
    ] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Also evaluate with test-time augmentation (logits averaged over the image "
            "and its flip for CIFAR, one-pixel shifts for MNIST), reported apart as TTA.",
        ),
    ] = False,
    where: WhereOpt = None,
) -> None:
    """Test loss/accuracy, wrong predictions, per-class accuracy and confusion matrix; with
    --group-by, statistics over seeds. Arguments may be folders (a sweep's checkpoints)."""
    from normcli.checkpoint import find_checkpoints
    from normcli.study import select_runs

    if json_ + markdown + csv > 1:
        raise NormcliError("give one of --json, --markdown, --csv")
    checkpoints = select_runs(find_checkpoints(checkpoints), where or [])
    if group_by is not None and tta:
        raise NormcliError("--tta evaluates the checkpoints; --group-by reads their stored metrics")
    if group_by is not None:
        _show_groups(checkpoints, group_by, json_, markdown, csv)
        return
    reports, ckpts = _evaluate(
        checkpoints, data_dir, limit, batch_size, device, confusion, overwrite, tta
    )
    _show_reports(reports, ckpts[0].meta.class_names, json_, markdown, csv)


def _show_reports(
    reports: list, class_names: list[str], json_: bool, markdown: bool, csv: bool
) -> None:
    from normcli.console import (
        comparison_rows,
        markdown_table,
        show_comparison,
        show_report,
        to_csv,
    )

    if json_:
        print_json([r.to_dict() for r in reports])
    elif markdown:
        print(markdown_table(reports))
    elif csv:
        print(to_csv(*comparison_rows(reports)), end="")
    elif len(reports) == 1:
        show_report(reports[0], class_names)
    else:
        show_comparison(reports)


def _evaluate(
    checkpoints: list[Path], data_dir: Path | None, limit: int | None, batch_size: int,
    device: Device, confusion: str | None, overwrite: bool, tta: bool,
) -> tuple[list, list]:  # fmt: skip
    """(reports, checkpoints): every checkpoint evaluated (`tta`: also by test-time
    augmentation), its confusion figure written."""
    from normcli import tta as protocol
    from normcli.checkpoint import load_checkpoint
    from normcli.console import step_progress
    from normcli.evaluate import report, test_splits
    from normcli.outputs import plan_outputs
    from normcli.runtime import resolve_device

    dev = resolve_device(device.value)
    ckpts = [load_checkpoint(p) for p in checkpoints]  # every input checked before any work
    if confusion is not None:
        defaults = [c.path.with_name(f"{c.path.stem}_confusion.png") for c in ckpts]
        plan = plan_outputs(confusion, defaults, overwrite, option="--confusion")
    splits = test_splits(ckpts, data_dir, limit, dev)
    reports = []
    with step_progress("evaluating", len(ckpts)) as advance:
        for ckpt in ckpts:
            advance(ckpt.path.name)
            evaluated = protocol.report if tta else report
            reports.append(evaluated(ckpt, splits[ckpt.meta.dataset], batch_size))
    if confusion is not None:
        _write_confusion(ckpts, reports, plan)
    return reports, ckpts


def _write_confusion(ckpts: list, reports: list, plan: Any) -> None:
    from normcli.plots import confusion_figure, save_figure

    with plan.claim() as paths:
        for ckpt, rep, path in zip(ckpts, reports, paths, strict=True):
            title = f"{rep.name}: {rep.label}, {rep.metrics.accuracy:.2f}% on {rep.dataset}"
            figure = confusion_figure(rep.metrics.confusion, ckpt.meta.class_names, title)
            save_figure(figure, path)
            print(path)


def _show_groups(
    checkpoints: list[Path], group_by: str, json_: bool, markdown: bool, csv: bool
) -> None:
    from normcli.console import flat_rows, group_rows, print_table, to_csv, to_markdown
    from normcli.study import parse_keys, study_table

    study = study_table(checkpoints, parse_keys(group_by))
    warn_study(study)
    keys, rows = study.keys, study.rows
    if json_:
        print_json(rows)
        return
    if csv:
        print(to_csv(*flat_rows(rows, keys)), end="")
        return
    columns, cells = group_rows(rows, keys)
    if markdown:
        print(to_markdown(columns, cells))
    else:
        print_table(f"{len(checkpoints)} runs by {', '.join(keys)}", columns, cells)


def misclassified(
    checkpoints: CkptsArg,
    n: Annotated[int, typer.Option("--n", help="How many misclassified images.")] = 10,
    sort: Annotated[
        SortOrder,
        typer.Option(help="index: first in test order; confidence: most confidently wrong."),
    ] = SortOrder.index,
    cols: Annotated[int, typer.Option(help="Grid columns.")] = 5,
    out: Annotated[
        str | None,
        typer.Option(
            help="Grid image path (.png/.svg/.pdf), or a folder (ending in /, or for several "
            "checkpoints; created if missing). "
            "Default: <checkpoint>_misclassified_n<N>_<sort>.png beside it.",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    batch_size: EvalBatchOpt = EVAL_BATCH_SIZE,
    device: DeviceOpt = Device.auto,
    json_: JsonOpt = False,
) -> None:
    """Write one annotated grid of misclassified test images per checkpoint (also with --json,
    which lists the images on stdout instead of the paths)."""
    from normcli.checkpoint import load_checkpoint
    from normcli.evaluate import test_splits
    from normcli.outputs import plan_outputs
    from normcli.runtime import resolve_device

    if n <= 0:
        raise NormcliError(f"--n must be a positive number of images, got {n}")
    if cols <= 0:
        raise NormcliError(f"--cols must be positive, got {cols}")
    dev = resolve_device(device.value)
    ckpts = [load_checkpoint(p) for p in checkpoints]
    # The name records what the grid shows: runs with another --n or --sort do not collide.
    name = f"misclassified_n{n}_{sort.value}.png"
    defaults = [c.path.with_name(f"{c.path.stem}_{name}") for c in ckpts]
    plan = plan_outputs(out, defaults, overwrite)
    splits = test_splits(ckpts, data_dir, limit, dev)
    with plan.claim() as paths:
        docs = [
            _write_grid(ckpt, splits[ckpt.meta.dataset], path, n, sort, cols, batch_size, json_)
            for ckpt, path in zip(ckpts, paths, strict=True)
        ]
    if json_:
        print_json(docs)


def _write_grid(
    ckpt: Any, split: Any, path: Path, n: int, sort: SortOrder, cols: int, batch_size: int,
    json_: bool,
) -> dict[str, Any]:  # fmt: skip
    """Write one checkpoint's grid (its path on stdout unless `json_`); returns its JSON doc."""
    from normcli.plots import write_misclassified_grid

    mistakes = write_misclassified_grid(
        ckpt, split, path, n=n, sort=sort.value, cols=cols, batch_size=batch_size
    )
    if len(mistakes) < n:
        stderr.print(
            f"{ckpt.path}: only {len(mistakes)} of {len(split)} test images are "
            f"misclassified (asked for {n}); showing those",
            highlight=False,
            markup=False,
        )
    names = ckpt.meta.class_names
    if not json_:
        print(path)
    return {
        "checkpoint": str(ckpt.path),
        "output": str(path),
        "misclassified": [
            {"index": m.index, "true": names[m.true], "predicted": names[m.predicted],
             "probability": m.probability}
            for m in mistakes
        ],
    }  # fmt: skip


def history(
    checkpoints: CkptsArg,
    json_: JsonOpt = False,
) -> None:
    """Per-epoch history of runs as CSV on stdout (one row per run and epoch), or --json."""
    from normcli.checkpoint import find_checkpoints
    from normcli.console import to_csv
    from normcli.history import history_columns, history_records

    paths = find_checkpoints(checkpoints)
    rows = history_records(paths)
    for empty in sorted({str(p) for p in paths} - {row["path"] for row in rows}):
        warn(f"{empty}: no epochs recorded")
    if json_:
        print_json(rows)
        return
    columns = history_columns()
    cells = [["" if row.get(c) is None else row.get(c) for c in columns] for row in rows]
    print(to_csv(columns, cells), end="")


def summary(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint to summarize.", show_default=False)
    ] = None,
    model: ModelOpt = None,
    norm: NormOpt = Norm.bn,
    groups: GroupsOpt = None,
    ws: WsOpt = None,
    compare: Annotated[bool, typer.Option(help="Parameters of the model for every norm.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the model registry.")] = False,
    json_: JsonOpt = False,
) -> None:
    """torchinfo layer table of a model (from a checkpoint or the registry), or the registry."""
    from normcli.console import print_table
    from normcli.summary import layer_summary, params_per_norm

    if list_:
        _show_registry(json_)
        return
    name, norm_name, group_count, net, run = _summary_target(checkpoint, model, norm, groups, ws)
    if compare:
        counts = params_per_norm(name, group_count)
        if json_:
            print_json({"model": name, "params": counts})
        else:
            print_table(
                f"{name}: trainable parameters per norm", ["norm", "params"], list(counts.items())
            )
        return
    result = layer_summary(net, name, norm_name, group_count)
    if json_:
        print_json({**result.to_dict(), **({"run": run} if run else {})})
        return
    if run:
        print(f"run: {run['label']}; {run['world_size']} process(es), batch {run['batch_size']} "
              f"({run['per_process_batch']} per process)")  # fmt: skip
    print(result.table)


def _summary_target(
    checkpoint: Path | None, model: str | None, norm: Norm, groups: int | None, ws: bool | None
) -> tuple[str, str, int | None, Any, dict | None]:
    """(model name, norm, groups, network, how it was trained) of a checkpoint, or of a
    registry model built with these options."""
    from normcli.checkpoint import load_checkpoint
    from normcli.models import build_model, resolve_groups

    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        m, t = ckpt.meta.model_args, ckpt.meta.train_args
        # how it was trained: label, processes, per-process batch
        run = {"label": ckpt.meta.label, "world_size": t.world_size,
               "batch_size": t.batch_size, "per_process_batch": t.per_process_batch}  # fmt: skip
        return m.model, m.norm, m.groups, ckpt.model, run
    if model is None:
        raise NormcliError("give a checkpoint, --model NAME, or --list")
    group_count = resolve_groups(model, norm.value, groups)
    net = build_model(model, norm=norm.value, groups=group_count, ws=ws)
    return model, norm.value, group_count, net, None


def _show_registry(json_: bool) -> None:
    from normcli.console import print_table
    from normcli.summary import registry_table

    rows = registry_table()
    if json_:
        print_json(rows)
        return
    print_table(
        "Model registry (parameters per norm)",
        ["model", "datasets", "default", *[f"params {n}" for n in rows[0]["params"]],
         "gn groups", "valid groups"],
        [(r["name"], " ".join(r["datasets"]), "yes" if r["default"] else "",
          *r["params"].values(), r["default_groups"], " ".join(map(str, r["valid_groups"])))
         for r in rows],
    )  # fmt: skip
