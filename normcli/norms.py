"""Norm layers by short name: one table, one uniform call `norm_layer(num_channels)`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

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


# name -> (factory, takes a group count, human label)
NORMS: dict[str, tuple[Callable[..., nn.Module], bool, str]] = {
    "bn": (nn.BatchNorm2d, False, "BatchNorm"),
    "gn": (_group_norm, True, "GroupNorm"),
    "ln": (_layer_norm, False, "LayerNorm"),
    "in": (_instance_norm, False, "InstanceNorm"),
    "none": (_no_norm, False, "no norm"),
}


def check_norm(norm: str, groups: int | None) -> int | None:
    """Validate a (norm, groups) pair; returns the group count to use (None for non-gn)."""
    if norm not in NORMS:
        raise NormcliError(f"unknown norm {norm!r}; available: {', '.join(NORMS)}")
    takes_groups = NORMS[norm][1]
    if not takes_groups:
        if groups is not None:
            raise NormcliError(f"--groups applies to gn only, not to {norm}")
        return None
    if groups is None:
        return DEFAULT_GROUPS
    if groups < 1:
        raise NormcliError(f"--groups must be a positive integer, got {groups}")
    return groups


def get_norm_layer(norm: str, groups: int | None = None) -> NormLayer:
    """The layer factory for `norm`: call it with a channel count to get a layer."""
    groups = check_norm(norm, groups)
    factory = NORMS[norm][0]
    return partial(factory, groups=groups) if groups is not None else factory


def norm_label(norm: str, groups: int | None = None, l1: float = 0.0) -> str:
    """Short human label, e.g. 'BN + L1 (1e-4)', 'GN (G=2)', 'LN'."""
    label = norm.upper()
    if norm == "gn" and groups is not None:
        label += f" (G={groups})"
    if l1:
        label += f" + L1 ({format_lambda(l1)})"
    return label


def format_lambda(value: float) -> str:
    """Compact scientific form for small coefficients: 1e-4, 2.5e-5."""
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
