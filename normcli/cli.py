"""The Typer app: one function per command; each parses, calls the library, prints.

Data goes to stdout (a path, or JSON with --json); progress, tables, hints and
errors go to stderr. Errors are mapped to one line and an exit code in `main`:
2 for a problem the user can fix, 1 for an internal error or a failed write to
stdout, 130 / 143 when interrupted by SIGINT / SIGTERM, 141 (quietly) when the
reader of stdout went away. The process entry point is `normcli.entry.run`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import sys
import traceback
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from normcli import __version__
from normcli.checkpoint import HISTORY_KEYS
from normcli.config import ModelArgs, RunSpec, TrainArgs
from normcli.console import stderr
from normcli.data import DATASETS
from normcli.entry import (
    BROKEN_PIPE,
    INTERRUPTED,
    StdoutError,
    interrupt_exit_code,
    interrupt_message,
)
from normcli.errors import NormcliError
from normcli.evaluate import EVAL_BATCH_SIZE
from normcli.norms import NORMS

app = typer.Typer(
    name="normcli",
    help="Compare BatchNorm, LayerNorm and GroupNorm in small CNNs on MNIST and CIFAR-10.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


# Closed choices for --help, derived from the library's tables so a new dataset or norm
# needs one entry, not two.
Dataset = Enum("Dataset", {name: name for name in DATASETS}, type=str)
Norm = Enum("Norm", {name: name for name in NORMS}, type=str)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# Shared option types: declared once so every command's help reads the same.
DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Data folder. Default: $NORMCLI_DATA, else ./data.", show_default=False),
]
DeviceOpt = Annotated[Device, typer.Option(help="auto picks cuda when a GPU is there.")]
LimitOpt = Annotated[
    int | None, typer.Option(help="Use only the first N images of each split.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
CkptArg = Annotated[Path, typer.Argument(help="Checkpoint written by `normcli train`.")]
CkptsArg = Annotated[list[Path], typer.Argument(help="Checkpoints written by `normcli train`.")]
NormOpt = Annotated[Norm, typer.Option(help="bn, gn (GroupNorm), ln (GroupNorm(1, C)), in, none.")]
GroupsOpt = Annotated[
    int | None,
    typer.Option(
        help="Groups for gn (default: the model's, see `normcli summary --list`).",
        show_default=False,
    ),
]
WsOpt = Annotated[
    bool | None,
    typer.Option(
        "--ws/--no-ws",
        help="Weight-standardized convolutions. Default: on for gn, ln, in; off for bn, none.",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(help="Registry name (see `normcli summary --list`).", show_default=False),
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="KEY=VALUE: only the runs with this option value, e.g. epochs=15 (repeatable; "
        "KEY=A,B for either value).",
        show_default=False,
    ),
]


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    pass


# The run options, declared once: their names, types and defaults are the fields of the run
# description (normcli.config); only the help text lives here. `train` takes each option as
# its type; a sweep takes comma lists of the same options.
RUN_OPTION_HELP: dict[str, str] = {
    "dataset": "Dataset to train on.",
    "model": "Registry name (see `normcli summary --list`). Default: the dataset's.",
    "norm": "bn, gn (GroupNorm), ln (GroupNorm(1, C)), in, none.",
    "groups": "Groups for gn (default: the model's, see `normcli summary --list`).",
    "ws": "Weight-standardized convolutions. Default: on for gn, ln, in; off for bn, none.",
    "dropout": "Dropout rate (model option). Default: the dataset's (0).",
    "epochs": "Default: 15 for the 28x28 datasets, 20 for CIFAR.",
    "batch_size": "Images per step, over all processes (--nproc). Default: 64 for 28x28; "
    "32 for CIFAR, 64 with bn.",
    "lr": "Peak one-cycle learning rate. Default: 0.05 for 28x28, 0.1 for CIFAR.",
    "momentum": "SGD Nesterov momentum, in [0, 1).",
    "weight_decay": "SGD weight decay. Default: 0 for 28x28, 5e-5 for CIFAR.",
    "l1": "L1 lambda: adds lambda * sum|w| to the loss.",
    "seed": "Seed for init, data order, augmentation and the validation split.",
    "augment": "The dataset's batch augmentation, on the device.",
    "limit": "Use only the first N images of each split.",
    "val": "Hold out N training images (chosen by the seed) as a validation split.",
    "channels_last": "channels_last memory layout for training. Default: on, off for gn.",
    "threads": "CPU threads per process. Default: torch's (all cores, or $OMP_NUM_THREADS); "
    "with several processes, the cores shared out among them; recorded.",
    "sync_bn": "With several processes: BatchNorm over the global batch, not each process's "
    "share (bn only).",
}
_CHOICES: dict[str, type[Enum]] = {"dataset": Dataset, "norm": Norm}


def run_option_parameters(as_lists: bool = False) -> list[inspect.Parameter]:
    """The run options as keyword parameters for a Typer command (typed from the run
    description's type hints); `as_lists`: each takes a comma-separated list instead."""
    hints = {**typing.get_type_hints(ModelArgs), **typing.get_type_hints(TrainArgs)}
    defaults = RunSpec().options()
    params = []
    for name, help_text in RUN_OPTION_HELP.items():
        kind, default = _CHOICES.get(name, hints[name]), defaults[name]
        if name in _CHOICES and default is not None:
            default = _CHOICES[name](default)
        decls = [f"--{name.replace('_', '-')}"]
        if typing.get_args(kind) == (bool, type(None)) or kind is bool:
            decls = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"]
        if as_lists:
            kind, default, decls = (
                str | None,
                None,
                decls[:1] if "/" not in decls[0] else [f"--{name.replace('_', '-')}"],
            )
        option = typer.Option(*decls, help=help_text, show_default=default is not None)
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option],
            default=default,
        ))  # fmt: skip
    return params


def with_run_options(as_lists: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command also takes every run option (Typer reads `__signature__`)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=[*own, *run_option_parameters(as_lists)])
        return fn

    return decorate


def spec_from_options(options: dict[str, Any]) -> RunSpec:
    """The run description from parsed option values."""
    values = {k: v.value if isinstance(v, Enum) else v for k, v in options.items()}
    return RunSpec.from_options(**values).resolve()


# Parameters whose name opens a library message: the CLI shows them as the flags users typed.
_FLAG_NAMES = frozenset({*RUN_OPTION_HELP, "n", "cols", "device"})


def as_flags(message: str) -> str:
    """A library message that starts with a parameter's name, with the flag instead."""
    first, _, rest = message.partition(" ")
    if first in _FLAG_NAMES and rest:
        return f"--{first.replace('_', '-')} {rest}"
    return message


_NOT_WITH_RESUME = (*RUN_OPTION_HELP, "out", "overwrite")


@app.command()
@with_run_options()
def train(
    ctx: typer.Context,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = Device.auto,
    out: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint path, or a folder (ending in /) for the default name. "
            "Default: checkpoints/<run>.safetensors",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing checkpoint.")] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its checkpoint.")
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            help="Train data-parallel in N processes on this machine, started by torchrun's "
            "launcher; --batch-size is the global batch, each process takes batch/N.",
            show_default=False,
        ),
    ] = None,
    **options: Any,
) -> None:
    """Train a model; prints the checkpoint path on stdout."""
    from normcli import parallel

    with parallel.worker_errors():  # under a launcher: one error line, not one per process
        _train(ctx, data_dir, device.value, out, overwrite, resume, nproc, options)


def _train(
    ctx: typer.Context,
    data_dir: Path | None,
    device: str,
    out: Path | None,
    overwrite: bool,
    resume: Path | None,
    nproc: int | None,
    options: dict[str, Any],
) -> None:
    from contextlib import nullcontext

    from normcli import parallel
    from normcli.console import ProgressReporter
    from normcli.train import SilentReporter, resume_training
    from normcli.train import train as run_training

    if nproc is not None and nproc < 1:
        raise NormcliError(f"--nproc must be a positive number of processes, got {nproc}")
    if nproc is not None and parallel.launched():
        raise NormcliError("--nproc starts processes; this one was started by a launcher")
    if resume is not None:
        _refuse_run_options_with_resume(ctx)
    else:
        spec = spec_from_options({**options, "world_size": nproc or parallel.run_size()})
    if nproc is not None:  # this process only starts the workers, which run this command
        _launch_workers(ctx, nproc, spec if resume is None else None, resume, data_dir,
                        device, out, overwrite)  # fmt: skip
        return
    main_process = parallel.is_main_process()  # under a launcher, rank 0 alone reports
    progress = ProgressReporter() if main_process else nullcontext(SilentReporter())
    with progress as reporter:
        if resume is not None:
            result = resume_training(resume, data_dir=data_dir, device=device, reporter=reporter)
        else:
            result = run_training(
                spec, data_dir=data_dir, device=device, out=out,
                overwrite=overwrite, reporter=reporter,
            )  # fmt: skip
    if main_process:
        _report_training(result)


def _refuse_run_options_with_resume(ctx: typer.Context) -> None:
    given = [
        "/".join(param.opts + param.secondary_opts)  # --ws/--no-ws names both spellings
        for param in ctx.command.params
        if param.name in _NOT_WITH_RESUME
        and getattr(ctx.get_parameter_source(param.name), "name", "") == "COMMANDLINE"
    ]
    if given:
        raise NormcliError(
            f"--resume takes its settings from the checkpoint; drop {', '.join(given)}"
        )


def _report_training(result: Any) -> None:
    """The final numbers on stderr, the checkpoint's path on stdout."""
    if result.history:
        last = result.history[-1]
        best = max(r["test_accuracy"] for r in result.history)
        epochs = len(result.history)
        stderr.print(
            f"{result.params:,} params; final test accuracy {last['test_accuracy']:.2f}% "
            f"(best {best:.2f}%) after {epochs} epoch{'s' if epochs != 1 else ''}",
            highlight=False,
        )
    print(result.path)


def _launch_workers(
    ctx: typer.Context,
    nproc: int,
    spec: RunSpec | None,
    resume: Path | None,
    data_dir: Path | None,
    device: str,
    out: Path | None,
    overwrite: bool,
) -> None:
    """`train --nproc`: check what can be checked here, then run `nproc` workers of this
    command through torchrun's launcher. Each gets the run options as resolved here, so every
    one trains the run validated here; rank 0 prints the progress and the path."""
    from normcli import parallel
    from normcli.checkpoint import read_metadata
    from normcli.config import default_threads
    from normcli.train import check_world_size, output_path, resolve_device

    parallel.check_devices(nproc, resolve_device(device))
    args = ["--debug"] if ctx.find_root().params.get("debug") else []
    args += ["train", "--device", device]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    if resume is not None:
        meta = read_metadata(resume)
        check_world_size(meta, resume, nproc)
        threads = meta.train_args.threads
        args += ["--resume", str(resume)]
    else:
        assert spec is not None
        threads = spec.train.threads
        args += ["--out", str(output_path(spec, out, overwrite))]
        args += ["--overwrite"] if overwrite else []
        for name, value in spec.options().items():
            flag = f"--{name.replace('_', '-')}"
            if name not in RUN_OPTION_HELP or value is None:
                continue
            if isinstance(value, bool):
                args.append(flag if value else f"--no-{flag[2:]}")
            else:
                args += [flag, repr(value) if isinstance(value, float) else str(value)]
    parallel.launch(args, nproc, threads=threads or default_threads(nproc))


class SortOrder(str, Enum):
    index = "index"
    confidence = "confidence"


# The per-epoch metrics a curve can show: the history's keys (declared once, in
# checkpoint.EpochRecord), less the epoch number and the timings.
Metric = Enum(
    "Metric",
    {k: k for k in HISTORY_KEYS if k not in ("epoch", "seconds", "images_per_second")},
    type=str,
)


class Format(str, Enum):
    png = "png"
    svg = "svg"
    pdf = "pdf"


OverwriteOpt = Annotated[bool, typer.Option(help="Replace existing output files.")]
EvalBatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]


@app.command("eval")
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
    where: WhereOpt = None,
) -> None:
    """Test loss/accuracy, wrong predictions, per-class accuracy and confusion matrix; with
    --group-by, statistics over seeds. Arguments may be folders (a sweep's checkpoints)."""
    from normcli.checkpoint import find_checkpoints, load_checkpoint
    from normcli.console import step_progress
    from normcli.evaluate import report, test_splits
    from normcli.outputs import plan_outputs
    from normcli.study import select_runs
    from normcli.train import resolve_device

    if json_ + markdown + csv > 1:
        raise NormcliError("give one of --json, --markdown, --csv")
    checkpoints = select_runs(find_checkpoints(checkpoints), where or [])
    if group_by is not None:
        _show_groups(checkpoints, group_by, json_, markdown, csv)
        return
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
            reports.append(report(ckpt, splits[ckpt.meta.dataset], batch_size))
    if confusion is not None:
        from normcli.plots import confusion_figure, save_figure

        with plan.claim() as paths:
            for ckpt, rep, path in zip(ckpts, reports, paths, strict=True):
                title = f"{rep.name}: {rep.label}, {rep.metrics.accuracy:.2f}% on {rep.dataset}"
                figure = confusion_figure(rep.metrics.confusion, ckpt.meta.class_names, title)
                save_figure(figure, path)
                print(path)
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
        _print_json([r.to_dict() for r in reports])
    elif markdown:
        print(markdown_table(reports))
    elif csv:
        print(to_csv(*comparison_rows(reports)), end="")
    elif len(reports) == 1:
        show_report(reports[0], class_names)
    else:
        show_comparison(reports)


def _show_groups(
    checkpoints: list[Path], group_by: str, json_: bool, markdown: bool, csv: bool
) -> None:
    from normcli.console import flat_rows, group_rows, print_table, to_csv, to_markdown
    from normcli.study import parse_keys, study_table

    study = study_table(checkpoints, parse_keys(group_by))
    _warn_study(study)
    keys, rows = study.keys, study.rows
    if json_:
        _print_json(rows)
        return
    if csv:
        print(to_csv(*flat_rows(rows, keys)), end="")
        return
    columns, cells = group_rows(rows, keys)
    if markdown:
        print(to_markdown(columns, cells))
    else:
        print_table(f"{len(checkpoints)} runs by {', '.join(keys)}", columns, cells)


def _warn_study(study: Any) -> None:
    """The study's notes as warnings: options that split the groups, runs left out."""
    if study.split_by:
        _warn(f"{study.describe_split()}; to keep some, e.g. --where {study.example()}")
    for note in study.notes:
        _warn(note)


@app.command()
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
    from normcli.plots import write_misclassified_grid
    from normcli.train import resolve_device

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
    docs = []
    with plan.claim() as paths:
        for ckpt, path in zip(ckpts, paths, strict=True):
            split = splits[ckpt.meta.dataset]
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
            docs.append({
                "checkpoint": str(ckpt.path),
                "output": str(path),
                "misclassified": [
                    {"index": m.index, "true": names[m.true], "predicted": names[m.predicted],
                     "probability": m.probability}
                    for m in mistakes
                ],
            })  # fmt: skip
            if not json_:
                print(path)
    if json_:
        _print_json(docs)


@app.command()
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
    x: Annotated[
        str | None,
        typer.Option(help="Study plot: run option on the x axis (e.g. batch_size).",
                     show_default=False),
    ] = None,
    y: Annotated[
        str | None,
        typer.Option(
            help="Study plot: final metric (test_accuracy, test_error, ...). "
            "Default: test_accuracy.",
            show_default=False,
        ),
    ] = None,
    hue: Annotated[
        str | None,
        typer.Option(help="Study plot: one line per value of this option.", show_default=False),
    ] = None,
    where: WhereOpt = None,
) -> None:
    """Training curves of several runs on the same axes, from their stored histories; with
    --x, a study plot: a final metric against a run option, mean ± std over seeds."""
    from normcli.checkpoint import find_checkpoints, read_metadata
    from normcli.study import select_runs

    if x is None and (y or hue):
        raise NormcliError(f"{'--y' if y else '--hue'} is for a study plot: give --x too")
    if x is not None and metric:
        raise NormcliError("--metric draws training curves; a study plot (--x) draws --y")
    checkpoints = select_runs(find_checkpoints(checkpoints), where or [])
    metas = [read_metadata(p) for p in checkpoints]
    if x is not None:
        _study_plot(checkpoints, metas, x, y or "test_accuracy", hue, out, fmt, title, overwrite)
        return
    _curves_plot(checkpoints, metas, metric, out, fmt, title, overwrite)


def _curves_plot(
    checkpoints: list[Path], metas: list, metric: list | None, out: Path | None,
    fmt: Format | None, title: str | None, overwrite: bool,
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
        _warn(warning)
    with plan.claim() as paths:
        for metrics, path, image in zip(figures, paths, formats, strict=True):
            save_figure(curves_figure(runs, metrics, heading), path, image)
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
    _warn_study(study)
    hues = [k for k in study.keys if k != x]  # one line per value of hue and of each split
    fig = study_figure(study.rows, records, x, y, hues, title or default_title(metas))
    with plan.claim() as [path]:
        save_figure(fig, path, image)
        print(path)


@app.command()
def history(
    checkpoints: CkptsArg,
    json_: JsonOpt = False,
) -> None:
    """Per-epoch history of runs as CSV on stdout (one row per run and epoch), or --json."""
    from normcli.checkpoint import find_checkpoints, history_columns, history_records
    from normcli.console import to_csv

    paths = find_checkpoints(checkpoints)
    rows = history_records(paths)
    for empty in sorted({str(p) for p in paths} - {row["path"] for row in rows}):
        _warn(f"{empty}: no epochs recorded")
    if json_:
        _print_json(rows)
        return
    columns = history_columns()
    cells = [["" if row.get(c) is None else row.get(c) for c in columns] for row in rows]
    print(to_csv(columns, cells), end="")


@app.command()
@with_run_options(as_lists=True)
def sweep(
    out: Annotated[Path, typer.Option(help="Sweep folder: one checkpoint per point + manifest.")],
    data_dir: DataDirOpt = None,
    device: DeviceOpt = Device.cpu,
    workers: Annotated[
        int | None,
        typer.Option(help="Runs at a time. Default: CPUs / --cpus-per-run.", show_default=False),
    ] = None,
    cpus_per_run: Annotated[int, typer.Option(help="CPU threads per run.")] = 1,
    gpus_per_run: Annotated[float, typer.Option(help="GPU share per run, e.g. 0.25.")] = 0.0,
    address: Annotated[
        str | None,
        typer.Option(help="Join a running Ray cluster: 'auto' or HOST:PORT.", show_default=False),
    ] = None,
    extend: Annotated[bool, typer.Option(help="Add the new points of a larger grid.")] = False,
    retries: Annotated[int, typer.Option(help="Retries of a run whose worker died.")] = 2,
    **options: Any,
) -> None:
    """Train the product of comma-separated run options (e.g. --norm bn,gn --seed 1,2,3), as
    Ray tasks; prints the sweep folder. Re-running resumes; see `eval --group-by`."""
    from normcli.console import SweepProgress
    from normcli.sweep import (
        check_point_output,
        import_ray,
        open_sweep,
        point_identity,
        run_sweep,
        train_point,
    )

    if device.value == "cuda" and gpus_per_run == 0:
        raise NormcliError("--device cuda needs --gpus-per-run (e.g. 0.25)")
    swept, fixed, points = sweep_grid(options, cpus_per_run)
    import_ray()  # without Ray: one line on how to install it, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    manifest, mode = open_sweep(
        out, swept, fixed, extend=extend, identity=point_identity, verify=check_point_output
    )
    task = functools.partial(
        train_point, data_dir=None if data_dir is None else str(data_dir.resolve()),
        device=device.value,
    )  # fmt: skip
    # Ray's own notices (a worker died, retries left) are printed to stdout from its threads:
    # stdout is for the folder path alone.
    with SweepProgress(manifest) as progress, contextlib.redirect_stdout(sys.stderr):
        outcomes = run_sweep(
            out, task, on_event=progress.event, workers=workers, cpus_per_run=cpus_per_run,
            gpus_per_run=gpus_per_run, address=address, max_retries=retries,
        )  # fmt: skip
    failed = sorted(name for name, o in outcomes.items() if o.status != "done")
    print(out)
    if failed:
        raise NormcliError(
            f"{len(failed)} of {len(points)} runs failed: {', '.join(failed[:5])}"
            f"{' ...' if len(failed) > 5 else ''}; see {out / 'manifest.json'}; "
            "re-run the same command to retry them",
            exit_code=1,
        )


def sweep_grid(options: dict[str, Any], threads: int) -> tuple[dict, dict, list]:
    """(swept, fixed, points) from the comma lists given; every point is resolved here, so a
    bad one is refused, by name, before anything runs."""
    from normcli.sweep import expand_grid

    parsed = {k: parse_list(k, v) for k, v in options.items() if v is not None}
    swept = {k: v for k, v in parsed.items() if len(v) > 1}
    fixed = {k: v[0] for k, v in parsed.items() if len(v) == 1}
    fixed.setdefault("threads", threads)
    try:
        points = expand_grid(swept, fixed)
    except NormcliError as e:  # the library names options; show the flags typed
        message = str(e)
        for name in parsed:
            message = message.replace(f"option {name}", f"--{name.replace('_', '-')}")
        raise NormcliError(message) from None
    for point in points:
        try:
            spec_from_options(point.options)
        except NormcliError as e:
            raise NormcliError(f"point {point.name}: {as_flags(str(e))}") from None
    return swept, fixed, points


def parse_list(name: str, text: str) -> list[Any]:
    """A comma-separated list of run option `name`'s values, each of the option's type."""
    hints = {**typing.get_type_hints(ModelArgs), **typing.get_type_hints(TrainArgs)}
    kinds = [k for k in (typing.get_args(hints[name]) or (hints[name],)) if k is not type(None)]
    flag = f"--{name.replace('_', '-')}"
    values = []
    for item in (part.strip() for part in text.split(",")):
        if name in _CHOICES and item not in _CHOICES[name].__members__:
            choices = ", ".join(_CHOICES[name].__members__)
            raise NormcliError(f"{flag}: {item!r} is not one of {choices}")
        values.append(_convert(item, kinds[0], flag))
    return values


def _convert(item: str, kind: type, flag: str) -> Any:
    """One value of a comma list as `kind` (int, float, bool, str)."""
    if kind is bool:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if item.lower() not in words:
            raise NormcliError(f"{flag}: {item!r} is not true or false")
        return words[item.lower()]
    try:
        return kind(item)
    except ValueError:
        raise NormcliError(f"{flag}: {item!r} is not a valid {kind.__name__}") from None


@app.command()
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
    from normcli.checkpoint import load_checkpoint
    from normcli.console import print_table
    from normcli.models import build_model, resolve_groups
    from normcli.summary import layer_summary, params_per_norm, registry_table

    if list_:
        rows = registry_table()
        if json_:
            _print_json(rows)
            return
        print_table(
            "Model registry (parameters per norm)",
            ["model", "datasets", "default", *[f"params {n}" for n in rows[0]["params"]],
             "gn groups", "valid groups"],
            [(r["name"], " ".join(r["datasets"]), "yes" if r["default"] else "",
              *r["params"].values(), r["default_groups"], " ".join(map(str, r["valid_groups"])))
             for r in rows],
        )  # fmt: skip
        return
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        name, norm_name, group_count, net = (
            ckpt.meta.model_args.model,
            ckpt.meta.model_args.norm,
            ckpt.meta.model_args.groups,
            ckpt.model,
        )
    elif model is not None:
        name, norm_name = model, norm.value
        group_count = resolve_groups(name, norm_name, groups)
        net = build_model(name, norm=norm_name, groups=group_count, ws=ws)
    else:
        raise NormcliError("give a checkpoint, --model NAME, or --list")
    if compare:
        counts = params_per_norm(name, group_count)
        if json_:
            _print_json({"model": name, "params": counts})
        else:
            print_table(
                f"{name}: trainable parameters per norm", ["norm", "params"], list(counts.items())
            )
        return
    result = layer_summary(net, name, norm_name, group_count)
    run = None
    if checkpoint is not None:  # how it was trained: label, processes, per-process batch
        t = ckpt.meta.train_args
        run = {"label": ckpt.meta.label, "world_size": t.world_size,
               "batch_size": t.batch_size, "per_process_batch": t.per_process_batch}  # fmt: skip
    if json_:
        _print_json({**result.to_dict(), **({"run": run} if run else {})})
        return
    if run:
        print(f"run: {run['label']}; {run['world_size']} process(es), batch {run['batch_size']} "
              f"({run['per_process_batch']} per process)")  # fmt: skip
    print(result.table)


def main(argv: list[str] | None = None) -> int:
    """Run the app; map every error to one stderr line and an exit code (see the module doc)."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = _run_app(args, debug="--debug" in args)
    try:
        sys.stdout.flush()  # a full stdout is only found out when the data is flushed
    except StdoutError as e:
        return _stdout_exit_code(e.error) if code == 0 else code
    return code


def _run_app(args: list[str], debug: bool) -> int:
    try:
        result = app(args=args, prog_name="normcli", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except NormcliError as e:
        _fail(as_flags(str(e)))
        return interrupt_exit_code() if e.exit_code == INTERRUPTED else e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:  # shell completion ends with sys.exit
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except typer.TyperException as e:  # usage errors: bad option, bad value, missing argument
        _fail(" ".join(e.format_message().replace("Value error, ", "").split()))
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _fail(interrupt_message())
        return interrupt_exit_code()
    except StdoutError as e:  # printing the result failed, not the work
        return _stdout_exit_code(e.error)
    except Exception as e:  # an internal error: still one line, unless --debug
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(e).__name__}: {e}".splitlines()[0])
        if not debug:
            print("rerun with --debug for the traceback", file=sys.stderr)
        return 1


def _stdout_exit_code(error: OSError | ValueError) -> int:
    if isinstance(error, BrokenPipeError):  # the reader has all it wanted (`| head -1`)
        return BROKEN_PIPE
    reason = getattr(error, "strerror", None) or str(error)
    _fail(f"cannot write to standard output ({reason})")
    return 1


def _fail(message: str) -> None:
    print(f"normcli: error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"normcli: warning: {message}", file=sys.stderr)


def _print_json(doc: Any) -> None:
    """One JSON document on stdout; a non-finite number is written as null (JSON has none)."""
    print(json.dumps(_finite(doc), indent=2, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
