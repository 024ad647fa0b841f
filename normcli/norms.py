"""Norm layers by short name: one table, one uniform call `norm_layer(num_channels)`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from normcli.errors import NormcliError

NormLayer = Callable[[int], nn.Module]

DEFAULT_GROUPS = 4


def _group_norm(num_channels: int, *, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, num_channels)


def _layer_norm(num_channels: int) -> nn.GroupNorm:
    # LayerNorm over (C, H, W) with a per-channel affine, as the GN paper defines it.
    return nn.GroupNorm(1, num_channels)


def _instance_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_channels, num_channels)


def _no_norm(num_channels: int) -> nn.Identity:
    return nn.Identity()


@dataclass(frozen=True)
class Norm:
    """One norm: how to build it and how to name it. Adding a norm is one entry in `NORMS`."""

    name: str  # the short name users type
    factory: Callable[..., nn.Module]  # factory(num_channels[, groups=G]) -> layer
    label: str  # short label in tables and legends, e.g. "GN"
    title: str  # human name, e.g. "GroupNorm"
    takes_groups: bool = False  # GroupNorm: the factory needs groups=G
    ws_default: bool = False  # weight-standardized convolutions unless told otherwise
    uses_batch_statistics: bool = False  # normalizes over the batch (BatchNorm)
    channels_last: bool = True  # the layout where no timed trial decides (see NORMS)


# The per-image norms weight-standardize their convolutions by default: they learn much more
# slowly than BatchNorm without it on these small CNNs (Qiao et al., 2019; the README's
# Results section has the --ws / --no-ws measurement).
# Without a timed trial (NORMCLI_TUNE=0, a GPU: normcli.tuning), GroupNorm trains in the
# contiguous layout: its channels_last kernels were the slower ones on an AMD EPYC (mnist_net,
# one thread: 1.1-1.6x faster contiguous), while BN and LN (= GroupNorm(1, C)) ran faster
# channels_last (bench/results/levers.md). On an AMX Xeon GN is faster channels_last in
# float32 (bench/results/precision.md): hence the per-CPU trial.
NORMS: dict[str, Norm] = {
    n.name: n
    for n in (
        Norm("bn", nn.BatchNorm2d, "BN", "BatchNorm", uses_batch_statistics=True),
        Norm("gn", _group_norm, "GN", "GroupNorm", takes_groups=True, ws_default=True,
             channels_last=False),
        Norm("ln", _layer_norm, "LN", "LayerNorm", ws_default=True),
        Norm("in", _instance_norm, "IN", "InstanceNorm", ws_default=True),
        Norm("none", _no_norm, "NONE", "no norm"),
    )
}


def get_norm(name: str) -> Norm:
    """The record of norm `name`; the error lists the valid names."""
    try:
        return NORMS[name]
    except KeyError:
        raise NormcliError(f"unknown norm {name!r}; available: {', '.join(NORMS)}") from None


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardization: every filter is shifted and scaled to zero mean and
    unit variance over its fan-in before it is applied (Qiao et al., 2019, "Micro-Batch
    Training with Batch-Channel Normalization and Weight Standardization"). No parameters
    are added; the stored weight is the raw one."""

    eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize(self.weight, self.eps), self.bias)


def standardize(weight: torch.Tensor, eps: float = WSConv2d.eps) -> torch.Tensor:
    """Each output filter of a conv weight (out, in, kh, kw) at zero mean, unit variance."""
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, correction=0)
    return (weight - mean) * torch.rsqrt(var + eps)


def resolve_ws(norm: str, ws: bool | None) -> bool:
    """Whether convolutions are weight-standardized: `ws`, or the norm's default when None."""
    return get_norm(norm).ws_default if ws is None else ws


def conv_layer(ws: bool) -> type[nn.Conv2d]:
    """The convolution class models build with."""
    return WSConv2d if ws else nn.Conv2d


def check_norm(norm: str, groups: int | None) -> int | None:
    """Validate a (norm, groups) pair; returns the group count to use (None for non-gn)."""
    if not get_norm(norm).takes_groups:
        if groups is not None:
            takers = ", ".join(n.name for n in NORMS.values() if n.takes_groups)
            raise NormcliError(f"groups apply to {takers} only, not to {norm}")
        return None
    if groups is None:
        return DEFAULT_GROUPS
    if groups < 1:
        raise NormcliError(f"groups must be a positive integer, got {groups}")
    return groups


def get_norm_layer(norm: str, groups: int | None = None) -> NormLayer:
    """The layer factory for `norm`: call it with a channel count to get a layer."""
    groups = check_norm(norm, groups)
    factory = NORMS[norm].factory
    return partial(factory, groups=groups) if groups is not None else factory


def norm_label(norm: str, groups: int | None = None, l1: float = 0.0, ws: bool = False) -> str:
    """Short human label, e.g. 'BN + L1 (1e-4)', 'GN (G=2) + WS', 'LN'."""
    record = get_norm(norm)
    label = record.label
    if record.takes_groups and groups is not None:
        label += f" (G={groups})"
    if ws:
        label += " + WS"
    if l1:
        label += f" + L1 ({format_lambda(l1)})"
    return label


def format_lambda(value: float) -> str:
    """Compact scientific form for small coefficients: 1e-4, 2.5e-5."""
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
