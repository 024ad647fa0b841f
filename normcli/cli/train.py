"""`normcli train`: one run, in this process or data-parallel in --nproc workers."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from normcli.cli.options import (
    DataDirOpt,
    Device,
    DeviceOpt,
    run_option_fields,
    spec_from_options,
    with_run_options,
)
from normcli.config import RunSpec, option_flags
from normcli.console import stderr
from normcli.errors import NormcliError

_NOT_WITH_RESUME = (*run_option_fields(), "out", "overwrite")


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
    from normcli import parallel
    from normcli.console import ProgressReporter
    from normcli.outputs import checkpoint_path
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
    if main_process:  # every line names the run: studies train several side by side
        name = (resume or checkpoint_path(spec.default_path(), out, overwrite)).stem
    progress = ProgressReporter(name=name) if main_process else nullcontext(SilentReporter())
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
            f"{result.path.stem}: {result.params:,} params; final test accuracy "
            f"{last['test_accuracy']:.2f}% (best {best:.2f}%) after {epochs} "
            f"epoch{'s' if epochs != 1 else ''}",
            highlight=False,
            markup=False,
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
    from normcli.outputs import checkpoint_path
    from normcli.run import check_world_size
    from normcli.runtime import default_threads, resolve_device

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
        args += ["--out", str(checkpoint_path(spec.default_path(), out, overwrite))]
        args += ["--overwrite"] if overwrite else []
        args += option_flags(spec.options())  # resolved: every worker trains this run
    parallel.launch(args, nproc, threads=threads or default_threads(nproc))
