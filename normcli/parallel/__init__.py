"""Data-parallel training: the processes of a run and their process group (group), their
failures reported as one line (failures), the local launcher behind `normcli train --nproc`
(launcher), and synchronized BatchNorm on the CPU as on CUDA (syncbn).

Every process trains; the main process (rank 0) evaluates, writes the checkpoint and shows
progress. Import from here: the submodules are how the package is laid out, not its API.
"""

from normcli.parallel.failures import was_interrupted, worker_errors
from normcli.parallel.group import (
    COLLECTIVE_TIMEOUT,
    World,
    barrier,
    check_devices,
    current_world,
    gather_to_main,
    is_distributed,
    is_main_process,
    launched,
    launched_world_size,
    local_main_first,
    process_group,
    rank,
    run_size,
    share_from_main,
    sum_across,
    wrap_ddp,
)
from normcli.parallel.launcher import launch
from normcli.parallel.syncbn import (
    CpuSyncBatchNorm,
    SyncBatchNormFunction,
    average_running_stats,
    convert_sync_batchnorm,
    sync_batch_norm,
)

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "CpuSyncBatchNorm",
    "SyncBatchNormFunction",
    "World",
    "average_running_stats",
    "barrier",
    "check_devices",
    "convert_sync_batchnorm",
    "current_world",
    "gather_to_main",
    "is_distributed",
    "is_main_process",
    "launch",
    "launched",
    "launched_world_size",
    "local_main_first",
    "process_group",
    "rank",
    "run_size",
    "share_from_main",
    "sum_across",
    "sync_batch_norm",
    "was_interrupted",
    "worker_errors",
    "wrap_ddp",
]
