"""`normcli sweep`: the grid of comma-separated run options, trained as Ray tasks.

Everything is checked before anything is written: the options, every point of the grid, the
sweep folder and what is already in it, then Ray itself (started or joined, able to hold a run);
only then is the manifest written and the runs started. The folder is held against other
normcli processes while the sweep runs (normcli.sweep.claim).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from normcli.cli.options import (
    DataDirOpt,
    Device,
    DeviceOpt,
    as_flags,
    parse_list,
    with_run_options,
)
from normcli.errors import NormcliError

# The engine's parameters as the flags that set them.
_ENGINE_FLAGS = {"workers": "--workers", "cpus_per_run": "--cpus-per-run",
                 "gpus_per_run": "--gpus-per-run", "max_retries": "--retries"}  # fmt: skip


@with_run_options(as_lists=True)
def sweep(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Sweep folder: one checkpoint per point + manifest.")],
    data_dir: DataDirOpt = None,
    device: DeviceOpt = Device.cpu,
    workers: Annotated[
        int | None,
        typer.Option(help="Runs at a time. Default: CPUs / --cpus-per-run.", show_default=False),
    ] = None,
    cpus_per_run: Annotated[
        int | None,
        typer.Option(
            help="CPUs reserved per run. Default: the largest --threads, else 1 (each run "
            "trains on --threads, default --cpus-per-run).",
            show_default=False,
        ),
    ] = None,
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
    from normcli.sweep import import_ray, train_point

    if device.value == "cuda" and gpus_per_run == 0:
        raise NormcliError("--device cuda needs --gpus-per-run (e.g. 0.25)")
    engine = {"workers": workers, "cpus_per_run": _cpus_per_run(cpus_per_run, options),
              "gpus_per_run": gpus_per_run, "address": address, "max_retries": retries}  # fmt: skip
    _check_engine(engine)
    swept, fixed, points = sweep_grid(options, engine["cpus_per_run"])
    import_ray()  # without Ray: one line on how to install it, before anything is written
    check_sweep_folder(out, swept, fixed, extend)
    task = functools.partial(
        train_point, data_dir=None if data_dir is None else str(data_dir.resolve()),
        device=device.value,
    )  # fmt: skip
    debug = bool(ctx.find_root().params.get("debug"))
    try:
        failed = _run(out, swept, fixed, extend, task, len(points), engine, debug)
    except KeyboardInterrupt:
        from normcli.runtime import INTERRUPTED

        raise NormcliError(_interrupted(out), exit_code=INTERRUPTED) from None
    print(out)
    if failed:
        raise NormcliError(
            f"{len(failed)} of {len(points)} runs failed: {', '.join(failed[:5])}"
            f"{' ...' if len(failed) > 5 else ''}; see {out / 'manifest.json'}; "
            "re-run the same command to retry them",
            exit_code=1,
        )


def _run(
    out: Path,
    swept: dict,
    fixed: dict,
    extend: bool,
    task: Any,
    points: int,
    engine: dict[str, Any],
    debug: bool,
) -> list[str]:
    """Claim the folder, start Ray, write the manifest, run the sweep; the failed points."""
    from normcli.console import SweepProgress
    from normcli.sweep import (
        check_point_output,
        claim_sweep,
        engine_session,
        open_sweep,
        point_identity,
        run_sweep,
    )

    session = {k: v for k, v in engine.items() if k != "max_retries"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(claim_sweep(out))
        check_sweep_folder(out, swept, fixed, extend)  # again, now that no one else can write
        # Ray prints notices (a worker died, retries left) to stdout from its threads: stdout
        # is for the folder path alone, and they show (on stderr) only with --debug.
        notices = sys.stderr if debug else stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115
        stack.enter_context(contextlib.redirect_stdout(notices))
        stack.enter_context(engine_session(points=points, verbose=debug, **session))
        manifest, _ = open_sweep(
            out, swept, fixed, extend=extend, identity=point_identity, verify=check_point_output
        )
        progress = stack.enter_context(SweepProgress(manifest))
        outcomes = run_sweep(out, task, on_event=progress.event, verbose=debug, **engine)
    return sorted(name for name, o in outcomes.items() if o.status != "done")


def _cpus_per_run(given: int | None, options: dict[str, Any]) -> int:
    """CPUs reserved per run: as given, else the largest --threads, else 1. Refuses --threads
    above a given --cpus-per-run: runs would take more cores than they reserved."""
    threads = parse_list("threads", options["threads"]) if options.get("threads") else []
    most = max(threads, default=None)
    if given is None:
        return most if isinstance(most, int) and most >= 1 else 1
    if isinstance(most, int) and given >= 1 and most > given:
        raise NormcliError(
            f"--threads {most} is more than the --cpus-per-run {given} each run reserves; "
            "raise --cpus-per-run, or leave it out to reserve the largest --threads"
        )
    return given


def _check_engine(engine: dict[str, Any]) -> None:
    """The engine's settings checked as the library checks them, named by their flags."""
    from normcli.sweep import check_engine_options, resolve_address

    try:
        check_engine_options(**engine)
        if engine["address"] is not None:
            resolve_address(engine["address"])
    except NormcliError as e:
        first, _, rest = str(e).partition(" ")
        raise NormcliError(f"{_ENGINE_FLAGS.get(first, first)} {rest}") from None


def check_sweep_folder(out: Path, swept: dict, fixed: dict, extend: bool) -> None:
    """Refuse, before anything is written, an --out that is not a folder and cannot be made,
    and a sweep already there that this request does not resume or extend."""
    from normcli.files import folders_to_make
    from normcli.sweep import MANIFEST_NAME, compare_manifest, load_manifest, point_identity

    if folders_to_make(out) or not (out / MANIFEST_NAME).exists():
        return
    compare_manifest(
        load_manifest(out), swept, fixed, extend=extend, where=str(out), identity=point_identity
    )


def _interrupted(out: Path) -> str:
    """The line for an interrupted sweep: what is done, and how to go on."""
    from normcli.sweep import load_manifest

    try:
        points = load_manifest(out)["points"]
    except NormcliError:  # stopped before the manifest was written
        return "interrupted; nothing was written"
    done = sum(p["status"] == "done" for p in points)
    return (
        f"interrupted; {done} of {len(points)} runs are done in {out}; "
        "re-run the same command to go on"
    )


def sweep_grid(options: dict[str, Any], threads: int) -> tuple[dict, dict, list]:
    """(swept, fixed, points) from the comma lists given; every point is resolved here, so a
    bad one is refused, by name, before anything runs. Runs train on `threads` threads unless
    --threads is given (as one value or a list)."""
    from normcli.config import RunSpec
    from normcli.sweep import expand_grid

    parsed = {k: parse_list(k, v) for k, v in options.items() if v is not None}
    swept = {k: v for k, v in parsed.items() if len(v) > 1}
    fixed = {k: v[0] for k, v in parsed.items() if len(v) == 1}
    if "threads" not in swept:
        fixed.setdefault("threads", threads)
    try:
        points = expand_grid(swept, fixed)
    except NormcliError as e:  # the library names options; show the flags typed
        message = str(e)
        for name in parsed:
            message = message.replace(f"option {name}", f"--{name.replace('_', '-')}")
        raise NormcliError(message) from None
    models: dict[Any, Any] = {}  # each model checked once: building one takes milliseconds
    for point in points:
        try:
            spec = RunSpec.from_options(**point.options)
            if spec.model not in models:
                models[spec.model] = spec.model.resolve()
            spec.train.resolve(models[spec.model])
        except NormcliError as e:
            raise NormcliError(f"point {point.name}: {as_flags(str(e))}") from None
    return swept, fixed, points
