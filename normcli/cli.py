"""The Typer app: one function per command; each parses, calls the library, prints.

Data goes to stdout (a path, or JSON with --json); progress, tables, hints and
errors go to stderr. Errors are mapped to one line and an exit code in `main`.
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
from normcli.errors import NormcliError

app = typer.Typer(
    name="normcli",
    help="Compare BatchNorm, LayerNorm and GroupNorm in small CNNs on MNIST and CIFAR-10.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Dataset(str, Enum):
    mnist = "mnist"
    cifar10 = "cifar10"


class Norm(str, Enum):
    bn = "bn"
    gn = "gn"
    ln = "ln"
    in_ = "in"
    none = "none"


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
    int | None, typer.Option(help="Groups for gn (default 4).", show_default=False)
]
ModelOpt = Annotated[
    str | None,
    typer.Option(help="Registry name (see `normcli summary --list`).", show_default=False),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        print(__version__)
        raise typer.Exit()


@app.command()
def train(
    dataset: Annotated[Dataset, typer.Option(help="Dataset to train on.")] = Dataset.mnist,
    norm: NormOpt = Norm.bn,
    groups: GroupsOpt = None,
    model: ModelOpt = None,
    l1: Annotated[float, typer.Option(help="L1 lambda: adds lambda * sum|w| to the loss.")] = 0.0,
    epochs: Annotated[int | None, typer.Option(help="Default: 15 mnist, 20 cifar10.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float | None, typer.Option(help="Peak one-cycle learning rate.")] = None,
    momentum: Annotated[float, typer.Option(help="SGD Nesterov momentum.")] = 0.9,
    weight_decay: Annotated[float | None, typer.Option(help="SGD weight decay.")] = None,
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

    with ProgressReporter() as reporter:
        if resume is not None:
            result = resume_training(
                resume, data_dir=data_dir, device=device.value, reporter=reporter
            )
        else:
            config = TrainConfig(
                dataset=dataset.value, model=model, norm=norm.value, groups=groups,
                dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and maps every error to one stderr line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="normcli", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except NormcliError as e:
        _fail(str(e))
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors: bad option, bad value, missing argument
        _fail(" ".join(e.format_message().split()))
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted")
        return 130
    except Exception as e:  # an internal error: still one line, unless --debug
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(e).__name__}: {e}".splitlines()[0])
        if not debug:
            print("rerun with --debug for the traceback", file=sys.stderr)
        return 1


def _fail(message: str) -> None:
    print(f"normcli: error: {message}", file=sys.stderr)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
