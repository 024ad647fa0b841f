"""Test-time augmentation (`normcli eval --tta`): an evaluation protocol of its own, reported
under its own name (`tta` in eval's JSON, "TTA" in its tables), never as the test accuracy.

A test image's logits are the mean of the network's logits over views of it, chosen from the
dataset's training augmentation: the image and its mirror image where training flips
horizontally (CIFAR); the image and its shifts by one pixel up, down, left and right where
training translates (MNIST and its kin); the image alone otherwise.

`report` is normcli.evaluate.report with the protocol's metrics beside the test metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from normcli import evaluate
from normcli.checkpoint import Checkpoint
from normcli.data import Dataset, Split, get_dataset
from normcli.evaluate import EVAL_BATCH_SIZE, CheckpointReport, Metrics, metrics, predict

View = Callable[[torch.Tensor], torch.Tensor]  # normalized images -> normalized images


def shift(x: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) moved `dy` pixels down and `dx` right; the uncovered border takes
    `fill` (per channel, broadcastable: the normalized value of a black pixel)."""
    h, w = x.shape[-2:]
    out = fill.to(x.dtype).expand_as(x).clone()
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def views(dataset: Dataset) -> dict[str, View]:
    """The views TTA averages over for `dataset`, by name; the first is the image itself."""
    chosen: dict[str, View] = {"identity": lambda x: x}
    augment = dataset.augment
    if augment.flip:
        chosen["hflip"] = lambda x: x.flip(-1)
    elif augment.shift or augment.crop_padding or augment.degrees:
        mean, std = torch.tensor(dataset.mean), torch.tensor(dataset.std)
        black = (-mean / std).view(1, -1, 1, 1)
        for name, (dy, dx) in {"up": (-1, 0), "down": (1, 0), "left": (0, -1),
                               "right": (0, 1)}.items():  # fmt: skip
            chosen[name] = lambda x, dy=dy, dx=dx: shift(x, dy, dx, black.to(x.device))
    return chosen


def predict_tta(
    model: nn.Module, split: Split, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE
) -> torch.Tensor:
    """The mean over `views(dataset)` of the model's logits for every image of `split`."""
    logits = [predict(model, split, dataset, batch_size, view=v) for v in views(dataset).values()]
    return torch.stack(logits).mean(0)


def evaluate_tta(
    model: nn.Module, split: Split, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE
) -> Metrics:
    """Metrics of the TTA logits on a whole split."""
    return metrics(predict_tta(model, split, dataset, batch_size), split.labels,
                   dataset.num_classes)  # fmt: skip


def report(ckpt: Checkpoint, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> CheckpointReport:
    """A loaded checkpoint evaluated on its dataset's test split (normcli.evaluate.report), and
    by the TTA protocol, reported apart."""
    spec = get_dataset(ckpt.meta.dataset)
    plain = evaluate.report(ckpt, split, batch_size)
    tta = evaluate_tta(ckpt.model, split, spec, batch_size)
    return dataclasses.replace(plain, tta=tta, tta_views=list(views(spec)))
