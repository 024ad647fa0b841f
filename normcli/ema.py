"""An exponential moving average of a network's weights (the --ema DECAY option): the weights
a run evaluates and saves, while SGD trains the live ones.

torch's AveragedModel keeps the average, updated after every optimizer step:
average = decay * average + (1 - decay) * weights, starting from the weights after the first
step. BatchNorm's running statistics are averaged like the weights (they follow the weights
they were gathered under); its integer batch counter is copied, as an average has no integer
form. A checkpoint holds the average as its model, which is what eval, plot and misclassified
read, and the live weights under `train.` for resuming.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

LIVE_PREFIX = "train."  # checkpoint tensors of the live (trained) weights of an averaged run


def _update(
    decay: float,
) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], object], None]:
    """AveragedModel's multi_avg_fn: the EMA for float tensors, a copy for integer ones (its
    tensors come grouped by device and dtype, so a group is one or the other)."""
    ema = get_ema_multi_avg_fn(decay)

    def update(
        averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], n: object
    ) -> None:
        if averaged[0].is_floating_point():
            ema(averaged, current, n)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An average of `model`'s weights and buffers with this decay (see the module doc)."""
    return AveragedModel(model, multi_avg_fn=_update(decay), use_buffers=True)


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live weights and buffers, as checkpoint tensors."""
    return {LIVE_PREFIX + k: v for k, v in model.state_dict().items()}


def restore(
    average: AveragedModel,
    model: nn.Module,
    averaged: Mapping[str, torch.Tensor],
    extra: Mapping[str, torch.Tensor],
    updates: int,
) -> str | None:
    """Load an averaged run's checkpoint: the average from `averaged` (its model's state), the
    live weights from `extra`, and the count of updates made; what does not fit, else None."""
    live = {k.removeprefix(LIVE_PREFIX): v for k, v in extra.items() if k.startswith(LIVE_PREFIX)}
    if set(live) != set(model.state_dict()):
        return "its live weights are missing or do not fit the model"
    try:
        model.load_state_dict(live)
        average.module.load_state_dict(averaged)
    except RuntimeError as e:
        return (str(e).strip().splitlines() or ["state does not load"])[-1].strip()
    average.n_averaged.fill_(updates)
    return None
