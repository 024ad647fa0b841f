"""The Typer app: one function per command; each parses, calls the library, prints.

Data goes to stdout (a path, or JSON with --json); progress, tables, hints and
errors go to stderr. Errors are mapped to one line and an exit code in `main`:
2 for a problem the user can fix, 1 for an internal error or a failed write to
stdout, 130 / 143 when interrupted by SIGINT / SIGTERM, 141 (quietly) when the
reader of stdout went away. The process entry point is `normcli.entry.run`.
"""

from __future__ import annotations

import json
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from normcli import __version__
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


# Options that decide a run; with --resume they come from the checkpoint instead.
_RUN_OPTIONS = (
    "dataset", "norm", "groups", "ws", "model", "l1", "epochs", "batch_size", "lr", "momentum",
    "weight_decay", "dropout", "seed", "augment", "limit", "out", "overwrite",
)  # fmt: skip


@app.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[Dataset, typer.Option(help="Dataset to train on.")] = Dataset.mnist,
    norm: NormOpt = Norm.bn,
    groups: GroupsOpt = None,
    ws: WsOpt = None,
    model: ModelOpt = None,
    l1: Annotated[float, typer.Option(help="L1 lambda: adds lambda * sum|w| to the loss.")] = 0.0,
    epochs: Annotated[int | None, typer.Option(help="Default: 15 mnist, 20 cifar10.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step. Default: 64 mnist; 32 cifar10, 64 with bn.")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak one-cycle learning rate. Default: 0.05 mnist, 0.1 cifar10."),
    ] = None,
    momentum: Annotated[float, typer.Option(help="SGD Nesterov momentum.")] = 0.9,
    weight_decay: Annotated[
        float | None, typer.Option(help="SGD weight decay. Default: 0 mnist, 5e-5 cifar10.")
    ] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout rate (model option).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, data order, augmentation.")] = 1,
    augment: Annotated[bool, typer.Option(help="Batch augmentation on the device.")] = True,
    limit: LimitOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = Device.auto,
    out: Annotated[
        Path | None, typer.Option(help="Checkpoint path. Default: checkpoints/<run>.safetensors")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing checkpoint.")] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its checkpoint.")
    ] = None,
) -> None:
    """Train a model; prints the checkpoint path on stdout."""
    from normcli.console import ProgressReporter
    from normcli.train import TrainConfig, resume_training
    from normcli.train import train as run_training

    if resume is not None:
        given = [
            "/".join(param.opts + param.secondary_opts)  # --ws/--no-ws names both spellings
            for param in ctx.command.params
            if param.name in _RUN_OPTIONS
            and getattr(ctx.get_parameter_source(param.name), "name", "") == "COMMANDLINE"
        ]
        if given:
            raise NormcliError(
                f"--resume takes its settings from the checkpoint; drop {', '.join(given)}"
            )
    with ProgressReporter() as reporter:
        if resume is not None:
            result = resume_training(
                resume, data_dir=data_dir, device=device.value, reporter=reporter
            )
        else:
            config = TrainConfig(
                dataset=dataset.value, model=model, norm=norm.value, groups=groups,
                ws=ws, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
                momentum=momentum, weight_decay=weight_decay, l1=l1, seed=seed,
                augment=augment, limit=limit,
            )  # fmt: skip
            result = run_training(
                config, data_dir=data_dir, device=device.value, out=out,
                overwrite=overwrite, reporter=reporter,
            )  # fmt: skip
    if result.history:
        last = result.history[-1]
        best = max(r["test_accuracy"] for r in result.history)
        stderr.print(
            f"{result.params:,} params; final test accuracy {last['test_accuracy']:.2f}% "
            f"(best {best:.2f}%) after {len(result.history)} epochs",
            highlight=False,
        )
    print(result.path)


class SortOrder(str, Enum):
    index = "index"
    confidence = "confidence"


class Metric(str, Enum):
    test_loss = "test_loss"
    test_accuracy = "test_accuracy"
    train_loss = "train_loss"
    train_accuracy = "train_accuracy"
    lr = "lr"


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
) -> None:
    """Test loss/accuracy, wrong predictions, per-class accuracy and confusion matrix."""
    from normcli.checkpoint import load_checkpoint
    from normcli.console import markdown_table, show_comparison, show_report, step_progress
    from normcli.evaluate import report, test_splits
    from normcli.outputs import plan_outputs
    from normcli.train import resolve_device

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
    if json_:
        _print_json([r.to_dict() for r in reports])
    elif markdown:
        print(markdown_table(reports))
    elif len(reports) == 1:
        show_report(reports[0], ckpts[0].meta.class_names)
    else:
        show_comparison(reports)


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
) -> None:
    """Training curves of several runs on the same axes, from their stored histories."""
    from normcli.checkpoint import read_metadata
    from normcli.outputs import image_format, plan_outputs
    from normcli.plots import (
        DEFAULT_GRID,
        curves_figure,
        default_title,
        mixed_datasets_warning,
        run_labels,
        save_figure,
    )

    metas = [read_metadata(p) for p in checkpoints]
    figures = [[m.value] for m in metric] if metric else [list(DEFAULT_GRID)]
    suffix = fmt.value if fmt else "png"
    defaults = [
        checkpoints[0].parent / f"{'curves' if len(f) > 1 else f[0]}.{suffix}" for f in figures
    ]
    plan = plan_outputs(out, defaults, overwrite)
    formats = [image_format(p) or suffix for p in plan]
    if fmt and formats[0] != fmt.value:
        raise NormcliError(f"--out {out} names a {formats[0]} file, but --format is {fmt.value}")
    runs = [
        (label, m.history) for label, m in zip(run_labels(metas, checkpoints), metas, strict=True)
    ]
    heading = title or default_title(metas)
    warning = mixed_datasets_warning(metas)
    if warning:
        _warn(warning)
    with plan.claim() as paths:
        for metrics, path, image in zip(figures, paths, formats, strict=True):
            save_figure(curves_figure(runs, metrics, heading), path, image)
            print(path)


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
    from normcli.summary import layer_summary, model_description, params_per_norm, registry_table

    if list_:
        rows = registry_table()
        for row in rows:
            row["description"] = model_description(row["name"])
        if json_:
            _print_json(rows)
            return
        print_table(
            "Model registry (parameters per norm)",
            ["model", "dataset", "default", *[f"params {n}" for n in rows[0]["params"]],
             "gn groups", "valid groups"],
            [(r["name"], r["dataset"], "yes" if r["default"] else "", *r["params"].values(),
              r["default_groups"], " ".join(map(str, r["valid_groups"]))) for r in rows],
        )  # fmt: skip
        return
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        name, norm_name, group_count, net = (
            ckpt.meta.model,
            ckpt.meta.norm,
            ckpt.meta.groups,
            ckpt.model,
        )
    elif model is not None:
        name, norm_name = model, norm.value
        group_count = resolve_groups(name, norm_name, groups)
        net = build_model(name, norm=norm_name, groups=group_count, ws=ws)
    else:
        raise NormcliError("give a checkpoint, --model NAME, or --list")
    if compare:
        counts = params_per_norm(name, group_count if norm_name == "gn" else None)
        if json_:
            _print_json({"model": name, "params": counts})
        else:
            print_table(
                f"{name}: trainable parameters per norm", ["norm", "params"], list(counts.items())
            )
        return
    result = layer_summary(net, name, norm_name, group_count)
    if json_:
        _print_json(result.to_dict())
    else:
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
        _fail(str(e))
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
    print(json.dumps(doc, indent=2))


def run() -> None:
    """Console-script entry point (kept for old installs; see `normcli.entry.run`)."""
    from normcli.entry import run as entry_run

    entry_run()
