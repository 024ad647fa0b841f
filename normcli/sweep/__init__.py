"""Sweeps: expand an option grid, keep a manifest, run each point as a Ray task.

Usable without the CLI. Ray is imported lazily, inside the functions that need it, so
`import normcli.sweep` works where Ray is not installed; those functions then raise
NormcliError(NEEDS_RAY). Aggregating the results over seeds is `normcli.study`'s job.

The pieces:

- `grid`: `expand_grid` turns {option: [values]} plus fixed options into `Point`s (a name that
  is a safe file name, and the full options of one run).
- `manifest`: `manifest.json` in the sweep folder records the grid, the fixed options and each
  point's status, attempts, last error, output file name and result, written only by the
  driver, whole and atomically. `open_sweep` creates it, resumes it, or extends it.
- `engine`: `run_points` runs one Ray task per point, at most `workers` in flight, events
  reported from the driver; `run_sweep` runs a manifest's points not done yet and keeps it
  current. `cluster` starts a private Ray (`local`: quiet, signals kept, its session folder
  removed, its processes reaped by `reaper` even if the driver is killed) or joins a cluster.
- `claim`: one sweep at a time in a folder (`claim_sweep`).
- `task`: `train_point`, the task that trains one normcli run; `check_point_output`, which
  `open_sweep` uses to verify each point's file before trusting the manifest (a done point
  whose checkpoint is missing, truncated or unfinished runs again; a checkpoint of another
  run is refused, never replaced); `point_identity`, by which an option spelled out at its
  default is the same point as one left out.

Where outputs go on a cluster: `task(options, output)` is called with `output` an absolute path
in the sweep folder. On one machine the task simply writes there. On a cluster the sweep folder
should be on a file system shared by all nodes (NFS or similar) at the same path, so that a
task writes its file where the driver will look. Tasks that run on another node than the driver
also send the bytes of the file they wrote back with their result; the driver writes them into
the sweep folder (atomically) only when its own copy is missing or different. So a cluster
without a shared folder still ends with every output in the driver's sweep folder, as long as
each file fits comfortably in Ray's object store (checkpoints of small CNNs do); if the sweep
folder does not exist on a worker's node, the task writes to a temporary file there instead.
The task function and normcli itself must be importable on every node (same environment).
"""

from normcli.sweep.claim import claim_sweep
from normcli.sweep.cluster import (
    NEEDS_RAY,
    check_engine_options,
    import_ray,
    one_line,
    resolve_address,
)
from normcli.sweep.engine import (
    EventHandler,
    Outcome,
    Task,
    engine_session,
    run_points,
    run_sweep,
    save_payload,
)
from normcli.sweep.grid import Point, expand_grid, format_value
from normcli.sweep.manifest import (
    DEFAULT_SUFFIX,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    STATUSES,
    Manifest,
    PointEntry,
    compare_manifest,
    create_manifest,
    load_manifest,
    manifest_points,
    new_manifest,
    open_sweep,
    records,
    update_point,
    verify_outputs,
    write_manifest,
)
from normcli.sweep.task import check_point_output, examine_output, point_identity, train_point

__all__ = [
    "DEFAULT_SUFFIX", "MANIFEST_FORMAT", "MANIFEST_NAME", "NEEDS_RAY", "STATUSES",
    "EventHandler", "Manifest", "Outcome", "Point", "PointEntry", "Task",
    "check_point_output", "compare_manifest", "create_manifest", "examine_output", "expand_grid",
    "format_value", "import_ray", "load_manifest", "manifest_points", "new_manifest", "one_line",
    "open_sweep", "point_identity", "records", "resolve_address", "run_points", "run_sweep",
    "save_payload", "train_point", "update_point", "verify_outputs", "write_manifest",
    "check_engine_options", "claim_sweep", "engine_session",
]  # fmt: skip
