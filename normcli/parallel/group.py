"""The processes of a data-parallel run: which one this is, their process group, and the
collectives the training loop needs.

A run of W processes is started by PyTorch's own launcher (torchrun's elastic agent;
normcli.parallel.launch runs it on this machine), which tells each worker its RANK,
LOCAL_RANK and WORLD_SIZE in the environment. `process_group` joins the group (gloo on the
CPU, nccl on CUDA with one GPU per local rank, every collective under COLLECTIVE_TIMEOUT).
Every process trains; the main process (rank 0: `rank`, `is_main_process`, `World.main`)
evaluates, writes the checkpoint and shows progress.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from normcli.errors import NormcliError


def _joined() -> bool:
    """Whether this process is in an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def is_distributed(group: Any = None) -> bool:
    """Whether a process group is initialized and `group` (default: the world) has > 1 rank."""
    # get_world_size is -1 on a rank outside `group`: such a rank normalizes locally.
    return _joined() and dist.get_world_size(group) > 1


# Every collective (and joining the group) gives up after this long, so a process whose
# partner hangs fails instead of waiting forever. (A partner that dies is noticed sooner: the
# launcher stops the others at once.) Rank 0 evaluates while the others wait in a collective:
# far less than this on normcli's datasets.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run; World() is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index among the run's processes on this machine (its GPU)

    @property
    def main(self) -> bool:
        """Whether this process evaluates, saves and reports (rank 0)."""
        return self.rank == 0


def launched() -> bool:
    """Whether a launcher (torchrun, `launch`) started this process: it sets RANK."""
    return "RANK" in os.environ


def _launcher_number(name: str, default: int) -> int:
    """The launcher's environment variable `name` as a number; `default` when it is unset."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise NormcliError(f"{name} is set but is not a number: {os.environ[name]!r}") from None


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, `launch`) started this one among; 1 when
    it was not started by one."""
    if not launched():
        return 1
    try:
        return int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise NormcliError("RANK is set but WORLD_SIZE is not a number of processes") from None


def rank() -> int:
    """This process's rank in its run: the process group's once joined, else the launcher's
    RANK; 0 for a process started on its own. The one answer to "which process is this"."""
    return dist.get_rank() if _joined() else _launcher_number("RANK", 0)


def is_main_process() -> bool:
    """Whether this is the process that reports: rank 0, or the only process."""
    return rank() == 0


def run_size() -> int:
    """The number of processes of this run: the initialized process group's, else the
    launcher's (1 for a process started on its own)."""
    return dist.get_world_size() if _joined() else launched_world_size()


def _world(size: int) -> World:
    """This process's World in a run of `size` processes (its rank from `rank`)."""
    mine = rank()
    return World(mine, size, _launcher_number("LOCAL_RANK", mine))


def current_world() -> World:
    """The world of the initialized process group; World() without one."""
    return _world(dist.get_world_size()) if _joined() else World()


def check_devices(processes: int, device: torch.device) -> None:
    """Refuse to run `processes` processes on CUDA with fewer GPUs (one GPU each)."""
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        raise NormcliError(
            f"{processes} processes on cuda need a GPU each; this machine has "
            f"{torch.cuda.device_count()}: use fewer processes or the cpu device"
        )


@contextmanager
def process_group(world_size: int, device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """Join the process group of a run of `world_size` processes; yields this process's World
    and the device it trains on (cuda:LOCAL_RANK on CUDA). gloo on the CPU, nccl on CUDA.

    A group that is already initialized (by the caller) is used as it is and left open;
    one this function joins from the launcher's environment is left on the way out. With
    world_size 1 there is nothing to join."""
    if _joined():
        world = current_world()
        if world.size != world_size:
            raise NormcliError(
                f"world_size {world_size}: the process group has {world.size} processes"
            )
        yield world, _rank_device(world, device)
        return
    if world_size == 1 and launched_world_size() == 1:
        yield World(), device
        return
    started = launched_world_size()
    if started != world_size:
        raise NormcliError(
            f"world_size {world_size}: the launcher started {started} "
            f"process{'es' if started != 1 else ''}"
            + ("" if launched() else " (start the run with normcli train --nproc)")
        )
    world = _world(world_size)
    device = _rank_device(world, device)
    cuda = device.type == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        timeout=COLLECTIVE_TIMEOUT,
        **({"device_id": device} if cuda else {}),  # nccl: bound to this process's GPU
    )
    try:
        yield world, device
    finally:
        dist.destroy_process_group()


def _rank_device(world: World, device: torch.device) -> torch.device:
    """The device of this process: its own GPU (by local rank) on CUDA."""
    if device.type != "cuda" or world.size == 1:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise NormcliError(
            f"process {world.rank} needs GPU {world.local_rank}; this machine has "
            f"{torch.cuda.device_count()}"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextmanager
def local_main_first(world: World) -> Iterator[None]:
    """Run the body on local rank 0 first, then on the machine's other processes: one of them
    downloads a missing dataset, the others read what it wrote. (Every process passes one
    barrier: the others before the body, local rank 0 after it.)"""
    if world.size > 1 and world.local_rank != 0:
        barrier()
    yield
    if world.size > 1 and world.local_rank == 0:
        barrier()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (which stays the module to evaluate and save).

    Buffers are not broadcast from rank 0 at every step: each process keeps the BatchNorm
    running statistics of its own shares, and `average_running_stats` makes them one before
    anything reads them (timm's --dist-bn reduce)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Newer torch names the option forward_sync_buffers (buffers are still made equal once,
    # at the start, where they are equal anyway); older torch knows broadcast_buffers only.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process, in place (unchanged with one process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def share_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process (a picklable object; others pass anything)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any) -> list[Any]:
    """Every process's `obj`, by rank (a list of one with one process)."""
    if not is_distributed():
        return [obj]
    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def barrier() -> None:
    """Wait until every process gets here (nothing with one process)."""
    if is_distributed():
        dist.barrier()
