"""`normcli sweep`: the grid of comma-separated run options, trained as Ray tasks."""

from __future__ import annotations

import contextlib
import functools
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
    spec_from_options,
    with_run_options,
)
from normcli.errors import NormcliError


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
