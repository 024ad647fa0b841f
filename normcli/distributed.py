"""Data-parallel training: the processes of a run, their process group, the collectives the
training loop needs, the local launcher behind `normcli train --nproc`, and synchronized
BatchNorm on the CPU as on CUDA.

Processes. A run of W processes is started by PyTorch's own launcher (torchrun's elastic
agent; `launch` runs it on this machine with a rendezvous on a free port of 127.0.0.1), which
tells each worker its RANK, LOCAL_RANK and WORLD_SIZE in the environment. `process_group`
joins the group (gloo on the CPU, nccl on CUDA with one GPU per local rank, every collective
under COLLECTIVE_TIMEOUT). Every process trains; the main process (rank 0) evaluates, writes
the checkpoint and shows progress. `worker_errors` turns a worker's failure into one line:
recorded for the launcher in torchelastic's error file, printed by rank 0 (under torchrun) or
by `launch` (under `normcli train --nproc`), never once per process.

Synchronized BatchNorm. torch.nn.SyncBatchNorm only runs on CUDA (its statistics kernels
have no CPU version), so the CPU path here is a BatchNorm whose statistics are all-reduced
with torch.distributed (gloo works on the CPU). Nothing here needs an initialized process
group to be imported or used: without one, or with a single process, every layer behaves
exactly like nn.BatchNorm2d.

Gradient convention. In data-parallel training rank r computes its own loss L_r, and the
objective is their mean over the W ranks, which is what DDP optimizes: it all-reduces every
parameter gradient and divides by W. The synchronized layer returns, on rank r:

* grad_input: d(L_1 + ... + L_W) / d(rank r's input), exact, through the shared statistics;
* grad_weight, grad_bias: the LOCAL sums over rank r's own batch, so that their sum over
  ranks is d(L_1 + ... + L_W) / d(weight).

Everything upstream then also holds rank r's share of the gradient of the sum, and DDP's
sum-then-divide by W turns every parameter gradient into the gradient of the mean loss
(L_1 + ... + L_W) / W. This is the convention of torch.nn.SyncBatchNorm. Non-DDP users who
all-reduce gradients themselves must divide by W too (or not, to get the gradient of the sum).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from normcli.errors import NormcliError
from normcli.runtime import INTERRUPTED, STOP_SIGNALS

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
    "run_size",
    "share_from_main",
    "sum_across",
    "sync_batch_norm",
    "was_interrupted",
    "worker_errors",
    "wrap_ddp",
]

# Statistics and gradient sums are accumulated in float64 whatever the input dtype: the
# variance is E[x^2] - E[x]^2 (the only form that needs a single all-reduce), which cancels
# in float32 once |mean| is a few hundred times the standard deviation; in float64 its
# relative error is about 1e-16 * (mean / std)^2, negligible for activations.
_ACC = torch.float64


def is_distributed(group: Any = None) -> bool:
    """Whether a process group is initialized and `group` (default: the world) has > 1 rank."""
    # get_world_size is -1 on a rank outside `group`: such a rank normalizes locally.
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel one (dim 1)."""
    return [0, *range(2, x.dim())]


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) vector cast to x's dtype and shaped (1, C, 1, ...) to broadcast against x."""
    return v.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of all ranks' batches: one packed all-reduce each way.

    apply(x, weight, bias, eps, group) -> (y, mean, unbiased_var); mean and var are the global
    per-channel statistics in float64, not differentiable, for the running-stat update.
    Every rank in `group` must call it, and backpropagate through it, the same number of
    times: both passes are collectives.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalize x with the statistics of every rank's batch; returns y, mean, var."""
        channels = x.shape[1]
        dims = _reduce_dims(x)
        x_acc = x.to(_ACC)
        # Ranks may hold different batch sizes (even empty ones): all-reducing the count
        # with the sums weights every rank by its number of values.
        local_count = math.prod(x.shape[d] for d in dims)
        packed = torch.cat(
            [x_acc.sum(dims), x_acc.square().sum(dims), x_acc.new_tensor([local_count])]
        )
        dist.all_reduce(packed, group=group)
        count = packed[-1].item()
        # All ranks see the same count, so all raise together rather than one hanging.
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count:g} "
                f"over all ranks (input size {list(x.shape)} here)"
            )
        mean = packed[:channels] / count
        var = (packed[channels : 2 * channels] / count - mean.square()).clamp_min(0)
        invstd = torch.rsqrt(var + eps)

        x_hat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        y = x_hat
        if weight is not None:
            y = y * _per_channel(weight, x)
        if bias is not None:
            y = y + _per_channel(bias, x)

        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = count
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The running variance is the unbiased estimate, as nn.BatchNorm2d keeps it.
        unbiased = var * (count / (count - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: torch.Tensor, _grad_mean: Any, _grad_var: Any
    ) -> tuple[torch.Tensor | None, ...]:
        """grad_input through the global statistics; local grad_weight and grad_bias."""
        x, weight, mean, invstd = ctx.saved_tensors
        dims = _reduce_dims(x)
        x_hat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        sum_dy = grad_y.sum(dims, dtype=_ACC)
        sum_dy_xhat = (grad_y * x_hat).sum(dims, dtype=_ACC)

        # Always all-reduce, even where this rank needs no grad_input: the collective must
        # happen on every rank or the others wait forever, and it is only 2 * C numbers.
        packed = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(packed, group=ctx.group)
        channels = x.shape[1]
        mean_dy = packed[:channels] / ctx.count
        mean_dy_xhat = packed[channels:] / ctx.count

        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # d/dx of w * (x - mean) * invstd + b, with mean and invstd functions of every
            # rank's x: the usual BN backward, with the two means taken over all ranks.
            scale = invstd if weight is None else invstd * weight.to(_ACC)
            grad_x = (
                grad_y - _per_channel(mean_dy, x) - x_hat * _per_channel(mean_dy_xhat, x)
            ) * _per_channel(scale, x)
        # Local sums, not global ones: DDP sums these over ranks (see the module docstring).
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


def sync_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    group: Any = None,
) -> torch.Tensor:
    """Training-mode batch norm with statistics over every rank of `group`; updates the
    running buffers (when given) in place as F.batch_norm does."""
    y, mean, var = SyncBatchNormFunction.apply(x, weight, bias, eps, group)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return y


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics span every rank of the process group.

    Parameters, buffers and state-dict keys are nn.BatchNorm2d's, so checkpoints stay
    ordinary. It synchronizes only in training mode with an initialized group of more than
    one rank; otherwise (eval mode, one process) it is nn.BatchNorm2d. momentum=None (the
    cumulative average over num_batches_tracked) works as in nn.BatchNorm2d.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        # A plain attribute, not state: None means the default (world) group.
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Batch norm; synchronized across ranks when training in a multi-process group."""
        if not (self.training and is_distributed(self.process_group)):
            return super().forward(input)
        self._check_input_dim(input)
        # The momentum bookkeeping of _BatchNorm.forward, step for step.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # Buffers that exist but are not tracked are left alone, as in nn.BatchNorm2d.
        track = self.track_running_stats
        return sync_batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            factor,
            self.eps,
            self.process_group,
        )


def _cpu_sync_from(bn: nn.BatchNorm2d) -> CpuSyncBatchNorm:
    """A CpuSyncBatchNorm holding bn's own parameter and buffer tensors."""
    sync = CpuSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    # Shared, not copied: the same Parameter objects (values, requires_grad, any .grad)
    # and the same buffer tensors, so whatever already refers to them stays valid.
    sync.weight = bn.weight
    sync.bias = bn.bias
    sync.running_mean = bn.running_mean
    sync.running_var = bn.running_var
    sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync


def _swap_batchnorm2d(module: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
    """module with every exact nn.BatchNorm2d in it replaced; `done` maps old ids to new."""
    if type(module) is nn.BatchNorm2d:
        # A layer registered twice stays one layer after conversion.
        if id(module) not in done:
            done[id(module)] = _cpu_sync_from(module)
        return done[id(module)]
    for name, child in list(module.named_children()):
        new = _swap_batchnorm2d(child, done)
        if new is not child:
            setattr(module, name, new)
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The model with its BatchNorm layers synchronized across ranks, for training on device.

    On CUDA this is torch.nn.SyncBatchNorm.convert_sync_batchnorm (every _BatchNorm). On the
    CPU every module whose type is exactly nn.BatchNorm2d becomes a CpuSyncBatchNorm sharing
    its parameters and buffers; subclasses and other BatchNorm kinds are left as they are.
    Call it before building the optimizer and before wrapping the model in DDP, and use the
    returned model: a BatchNorm2d at the root is replaced, not modified.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type != "cpu":
        raise ValueError(f"synchronized BatchNorm needs a cpu or cuda device, not {device}")
    return _swap_batchnorm2d(model, {})


def average_running_stats(model: nn.Module, group: Any = None) -> None:
    """Average every BatchNorm's running mean and variance over the ranks of `group`.

    timm's `--dist-bn reduce`: run before evaluating or saving, so every rank holds the same
    statistics. A no-op without an initialized group of more than one rank. Averaging the
    variances ignores the spread of the ranks' means; it is an estimate, as in timm.
    """
    if not is_distributed(group):
        return
    stats = [
        buffer
        for module in model.modules()
        if isinstance(module, _BatchNorm)
        for buffer in (module.running_mean, module.running_var)
        if buffer is not None
    ]
    if not stats:
        return  # the same model on every rank, so every rank skips the collective
    # One all-reduce for the whole model rather than two per layer.
    packed = torch.cat([s.detach().reshape(-1).to(_ACC) for s in stats])
    dist.all_reduce(packed, group=group)
    packed /= dist.get_world_size(group)
    with torch.no_grad():
        for s, avg in zip(stats, packed.split([s.numel() for s in stats]), strict=True):
            s.copy_(avg.view_as(s))


# ---------------------------------------------------------------------------
# The processes of a run and their process group
# ---------------------------------------------------------------------------

# Every collective (and joining the group) gives up after this long, so a process whose
# partner hangs fails instead of waiting forever. (A partner that dies is noticed sooner: the
# launcher stops the others at once.) Rank 0 evaluates while the others wait in a collective:
# far less than this on normcli's datasets.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)

# Set by `launch` for its workers: they record a failure for it and print nothing themselves.
LAUNCHER_ENV = "NORMCLI_LAUNCHER"


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


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, `launch`) started this one among; 1 when
    it was not started by one."""
    if "RANK" not in os.environ:
        return 1
    try:
        return int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise NormcliError("RANK is set but WORLD_SIZE is not a number of processes") from None


def run_size() -> int:
    """The number of processes of this run: the initialized process group's, else the
    launcher's (1 for a process started on its own)."""
    return current_world().size if dist.is_initialized() else launched_world_size()


def is_main_process() -> bool:
    """Whether this is the process that reports: rank 0, or the only process."""
    return os.environ.get("RANK", "0") == "0"


def current_world() -> World:
    """The world of the initialized process group; World() without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


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
    if dist.is_available() and dist.is_initialized():
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
    launched = launched_world_size()
    if launched != world_size:
        raise NormcliError(
            f"world_size {world_size}: the launcher started {launched} "
            f"process{'es' if launched != 1 else ''}"
            + ("" if "RANK" in os.environ else " (start the run with normcli train --nproc)")
        )
    world = World(
        int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    )
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


# ---------------------------------------------------------------------------
# Failures and interruptions of workers: one line, not one per process
# ---------------------------------------------------------------------------

_interrupted = False


def was_interrupted() -> bool:
    """Whether this worker was asked to stop (SIGINT or SIGTERM) inside `worker_errors`."""
    return _interrupted


def _stop(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM in a worker: stop as Ctrl-C does, once; the launcher may send both."""
    global _interrupted
    _interrupted = True
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def worker_errors() -> Iterator[None]:
    """Around the work of a process started by a launcher (nothing otherwise).

    SIGTERM, as the launcher sends it to stop the others when one process fails, interrupts
    like Ctrl-C; once the work has failed, both are ignored. A failure is recorded in
    torchelastic's error file (TORCHELASTIC_ERROR_FILE), where the launcher finds it. Rank 0
    then raises it as usual, to be reported; the other processes exit with its exit code and
    print nothing, and so does rank 0 under `launch`, which reports one line for all of them."""
    if "RANK" not in os.environ:
        yield
        return
    handlers = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        # A failed worker is on its way out. The launcher's signal to stop every worker may
        # still reach it: while it records its failure (an interrupt there would be a second
        # error line), or as late as the interpreter's shutdown (a traceback from torch's
        # finalizers). From here on the signals are ignored.
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)
        handlers.clear()
        code = _record_failure(e)
        if is_main_process() and LAUNCHER_ENV not in os.environ:
            raise
        raise SystemExit(code) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# What a collective raises when another process has gone (gloo's words; nccl's are DistErrors).
_PEER_GONE = re.compile(r"(reset|closed) by peer|Broken pipe|Connection refused|Socket closed")


def _record_failure(error: BaseException) -> int:
    """Write `error` to the launcher's error file as one line; returns the exit code.

    The record says what kind of failure it is, for the launcher to report the cause rather
    than its consequences: "user" (a NormcliError: the run cannot go on as described),
    "internal" (a bug, or a crash), "secondary" (an interruption, or a collective broken by
    another process's end)."""
    if isinstance(error, NormcliError):
        code, message, kind = error.exit_code, str(error), "user"
    elif isinstance(error, KeyboardInterrupt):
        code, message, kind = INTERRUPTED, "interrupted", "secondary"
    elif isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
        message, kind = f"exit {error.code}", "internal"
    else:
        code, kind = 1, "internal"
        message = f"internal error: {type(error).__name__}: {error}"
    message = (message.strip().splitlines() or [type(error).__name__])[0]
    gone = isinstance(error, dist.DistError) or bool(_PEER_GONE.search(str(error)))
    if _interrupted or code == INTERRUPTED or (kind == "internal" and gone):
        kind = "secondary"
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {
            "message": message,  # what torchrun shows as the failure
            "timestamp": int(time.time()),
            "normcli": {"rank": int(os.environ.get("RANK", 0)), "exit_code": code, "kind": kind},
        }
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(record))
        except OSError:
            pass  # the launcher then reports the exit code alone
    return code


# ---------------------------------------------------------------------------
# The local launcher: torchrun's elastic agent, in this process
# ---------------------------------------------------------------------------


def launch(args: Sequence[str], nproc: int, *, threads: int) -> None:
    """Run `python -m normcli ARGS` as `nproc` processes on this machine under PyTorch's
    elastic agent (what torchrun runs) and wait for them.

    The rendezvous is a c10d store on a free port of 127.0.0.1 (two runs at once do not
    collide); each worker gets OMP_NUM_THREADS=`threads`. The workers print their output (rank
    0's progress and result) directly; a failure of any of them becomes one NormcliError: the
    first worker's own error line, or which worker died of what."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise NormcliError(f"nproc must be a positive number of processes, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="normcli-workers-") as logs, _launch_env(threads):
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"normcli-{uuid.uuid4().hex}",
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # port 0: the agent's store takes a free one
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "normcli", *args)
        except ChildFailedError as e:
            raise _failure_line(e.failures, _records(logs)) from None
        except SignalException:  # Ctrl-C or SIGTERM to this process: the agent stopped all
            rec = _records(logs).get(0)
            message = rec["message"] if rec and rec["exit_code"] == INTERRUPTED else "interrupted"
            raise NormcliError(message, exit_code=INTERRUPTED) from None


@contextmanager
def _launch_env(threads: int) -> Iterator[None]:
    """The environment the agent hands its workers, and a quiet agent; restored afterwards.

    The agent installs its own SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers (to stop the workers):
    they are put back too, for callers that go on."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", LAUNCHER_ENV,
                                             "TORCHELASTIC_SIGNALS_TO_HANDLE")}  # fmt: skip
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    signals = [getattr(signal, name) for name in names if hasattr(signal, name)]
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    # The agent logs its progress (rendezvous, worker exits) at INFO to ERROR: the user's
    # output is the workers' own, and failures come back as one line.
    loggers = [
        logging.getLogger(name)
        for name in ("torch.distributed.elastic", "torch.distributed.launcher",
                     *logging.root.manager.loggerDict)  # fmt: skip
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))
    ]
    levels = {log: log.level for log in loggers}
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ[LAUNCHER_ENV] = "1"
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        for log, level in levels.items():
            log.setLevel(level)


def _records(logs: str) -> dict[int, dict[str, Any]]:
    """The failures the workers recorded (see `_record_failure`), by rank."""
    found = {}
    for path in Path(logs).rglob("error.json"):
        try:
            doc = json.loads(path.read_text())
            info = doc["normcli"]
            found[int(info["rank"])] = {"message": str(doc["message"]), **info}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours: reported by exit code
    return found


def _failure_line(failures: dict[int, Any], records: dict[int, dict[str, Any]]) -> Exception:
    """One NormcliError for the workers that failed (`failures`: rank -> ProcessFailure, as
    the agent saw them when it stopped the rest), the likeliest cause first: the lowest rank's
    NormcliError; else a process that died without a word (killed by a signal, crashed);
    else an internal error; else rank 0's (or the first) record."""

    def recorded(kind: str) -> list[int]:
        return sorted(r for r in failures if r in records and records[r]["kind"] == kind)

    if recorded("user"):
        rec = records[recorded("user")[0]]
        return NormcliError(rec["message"], exit_code=rec["exit_code"])
    silent = sorted(r for r in failures if r not in records)
    if silent:
        rank, failure = silent[0], failures[silent[0]]
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        message = f"worker process {rank} (pid {failure.pid}) {how}; all processes stopped"
        main = records.get(0)
        if main and main["message"].startswith("interrupted; "):  # what rank 0 had saved
            message += "; " + main["message"].removeprefix("interrupted; ")
        return NormcliError(message, exit_code=1)
    if recorded("internal"):
        rec = records[recorded("internal")[0]]
        return NormcliError(rec["message"], exit_code=rec["exit_code"])
    rec = records.get(0) or records[min(failures)]
    return NormcliError(rec["message"], exit_code=rec["exit_code"])
