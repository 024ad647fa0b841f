"""Synchronized BatchNorm on the CPU as on CUDA, and the averaging of running statistics.

torch.nn.SyncBatchNorm only runs on CUDA (its statistics kernels have no CPU version), so the
CPU path here is a BatchNorm whose statistics are all-reduced with torch.distributed (gloo
works on the CPU). Nothing here needs an initialized process group to be imported or used:
without one, or with a single process, every layer behaves exactly like nn.BatchNorm2d.

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

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from normcli.parallel.group import is_distributed

# Statistics and gradient sums are accumulated in float64 whatever the input dtype: the
# variance is E[x^2] - E[x]^2 (the only form that needs a single all-reduce), which cancels
# in float32 once |mean| is a few hundred times the standard deviation; in float64 its
# relative error is about 1e-16 * (mean / std)^2, negligible for activations.
_ACC = torch.float64


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
