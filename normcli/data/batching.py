"""Splits in memory and their batches: normalization, batched augmentation, data-parallel shares.

Whole splits live in memory as uint8 tensors on the training device; batches are sliced from
them and augmented as whole batches with tensor ops (no PIL, no DataLoader workers: on a
2-core machine those cost more than the model).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class ChannelStats(Protocol):
    """What normalizing needs of a dataset record (`Dataset` has it): per-channel mean and
    std. A protocol, so that this module does not import the records, which import it."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Split:
    """One dataset split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def select(self, index: torch.Tensor) -> Split:
        """The examples at `index` (a 1-D tensor of positions), in that order."""
        return Split(self.images[index], self.labels[index])

    def head(self, limit: int | None) -> Split:
        """The first `limit` examples (all of them when `limit` is None)."""
        if limit is None:
            return self
        return Split(self.images[:limit], self.labels[:limit])


# ---------------------------------------------------------------------------
# Batches and augmentation, on whatever device the split lives on
# ---------------------------------------------------------------------------


def normalize(images: torch.Tensor, spec: ChannelStats) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float32 normalized with the dataset's mean/std."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor, spec: ChannelStats) -> torch.Tensor:
    """Undo `normalize`: back to [0, 1] pixel values."""
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)


class Part(NamedTuple):
    """Rows start:stop of a batch of `size` images: the share of a global batch that one
    process takes. Random augmentation draws are made for the whole batch and sliced, so every
    image gets the draws it would get in one process, whatever the number of processes."""

    start: int
    stop: int
    size: int

    @classmethod
    def of(cls, size: int, index: int, count: int) -> Part:
        """Share `index` of `count` of a batch of `size`, as torch.tensor_split cuts it: the
        first size % count shares hold one image more."""
        base, extra = divmod(size, count)
        start = index * base + min(index, extra)
        return cls(start, start + base + (index < extra), size)


def _drawn(part: Part | None, n: int) -> tuple[int, slice]:
    """How many images to draw for, and which of the draws are x's (all of them without part)."""
    return (n, slice(None)) if part is None else (part.size, slice(part.start, part.stop))


def random_affine(
    x: torch.Tensor,
    max_degrees: float,
    max_shift: float,
    generator: torch.Generator,
    part: Part | None = None,
) -> torch.Tensor:
    """Rotate each image by U(-deg, deg) and translate by U(-shift, shift) pixels; zero fill.
    `part`: x holds these rows of a larger batch (see Part).

    The sampling grid is the one F.affine_grid(align_corners=False) gives, built as the sum of
    a per-row and a per-column term (the map is affine, so it separates): on the CPU that costs
    a quarter of affine_grid, whose batched product over every pixel cost more than the
    bilinear sampling itself (bench/results/levers.md)."""
    n, _, h, w = x.shape
    dev = x.device
    m, mine = _drawn(part, n)
    max_angle = math.radians(max_degrees)
    angle = (torch.rand(m, generator=generator, device=dev)[mine] * 2 - 1) * max_angle
    shift = (torch.rand(m, 2, generator=generator, device=dev)[mine] * 2 - 1) * max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    offset = shift * torch.tensor([2 / w, 2 / h], device=dev)  # pixels -> normalized [-1, 1]
    xs = (torch.arange(w, device=dev) * 2 + 1) / w - 1  # pixel centres, normalized
    ys = (torch.arange(h, device=dev) * 2 + 1) / h - 1
    # Output pixel (i, j) samples the input at (cos x_j - sin y_i + dx, sin x_j + cos y_i + dy).
    rows = torch.stack([-sin, cos], 1)[:, :, None] * ys + offset[:, :, None]  # (n, 2, h)
    cols = torch.stack([cos, sin], 1)[:, :, None] * xs  # (n, 2, w)
    grid = (rows[..., None] + cols[:, :, None, :]).permute(0, 2, 3, 1)  # (n, h, w, [x, y])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_crop_flip(
    x: torch.Tensor,
    padding: int,
    generator: torch.Generator,
    flip: bool = True,
    part: Part | None = None,
) -> torch.Tensor:
    """Random crop of each image from a zero-padded copy, then horizontal flip with p=0.5.
    `part`: x holds these rows of a larger batch (see Part)."""
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    m, mine = _drawn(part, n)
    dy = torch.randint(0, 2 * padding + 1, (m,), generator=generator, device=dev)[mine]
    dx = torch.randint(0, 2 * padding + 1, (m,), generator=generator, device=dev)[mine]
    rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]
    cols = torch.arange(w, device=dev)[None, :] + dx[:, None]
    if flip:
        mirror = torch.rand(m, generator=generator, device=dev)[mine] < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows, cols]


@dataclass(frozen=True)
class Augment:
    """Batch augmentation settings; each part can be switched off."""

    degrees: float = 0.0  # max rotation, degrees
    shift: float = 0.0  # max translation, pixels
    crop_padding: int = 0  # random crop from a zero-padded image, pixels
    flip: bool = False  # horizontal flip with probability 0.5

    @property
    def active(self) -> bool:
        return bool(self.degrees or self.shift or self.crop_padding or self.flip)

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator, part: Part | None = None
    ) -> torch.Tensor:
        """Augment a batch of [0, 1] float images (rows `part` of a batch, when given)."""
        if self.degrees or self.shift:
            x = random_affine(x, self.degrees, self.shift, generator, part)
        if self.crop_padding or self.flip:
            x = random_crop_flip(x, self.crop_padding, generator, flip=self.flip, part=part)
        return x


def batches(
    split: Split,
    spec: ChannelStats,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalized float images, labels) batches sliced from an in-memory split.

    shard=(index, count): yield only share `index` of `count` of every batch (Part.of), for
    data-parallel training. Every process draws the same order and the same augmentation for
    the whole batch and keeps its rows, so the shares of a batch are disjoint and together are
    exactly the batch one process would see."""
    n = len(split)
    dev = split.images.device
    if shuffle:
        order = torch.randperm(n, generator=generator, device=dev)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        part = Part.of(stop - start, *shard) if shard is not None else None
        if part is not None:
            start, stop = start + part.start, start + part.stop
        if shuffle:
            idx = order[start:stop]
            images, labels = split.images[idx], split.labels[idx]
        else:
            images = split.images[start:stop]
            labels = split.labels[start:stop]
        x = images.float().div_(255.0)
        if augment is not None and augment.active:
            x = augment(x, generator, part)
        yield normalize(x, spec), labels
