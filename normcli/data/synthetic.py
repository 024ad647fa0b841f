"""Tiny learnable datasets in the official file formats, for tests and benchmark smoke runs."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from normcli.data.batching import Split
from normcli.data.records import Dataset, get_dataset


def synthetic_split(dataset: Dataset, n: int, seed: int) -> Split:
    """`n` learnable uint8 images of `dataset`'s shape: class k has a bright block at a
    class-specific place over noise; labels cycle through the classes in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    k = dataset.num_classes
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    c, h, w = dataset.input_shape
    images = torch.randint(0, 60, (n, c, h, w), generator=g, dtype=torch.uint8)
    cols = math.ceil(math.sqrt(k))  # class k's block sits in cell (k // cols, k % cols)
    bh, bw = max(h // cols, 1), max(w // cols, 1)
    for i, label in enumerate(labels.tolist()):
        r, col = (label // cols) * bh, (label % cols) * bw
        images[i, :, r : r + bh, col : col + bw] = 230
    return Split(images, labels)


def write_synthetic(name: str, root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """Tiny learnable files of dataset `name` in its official format and folder under ROOT
    (for tests and benchmark smoke runs); returns ROOT."""
    dataset = get_dataset(name)
    train = synthetic_split(dataset, n_train, seed=2 * len(name))
    test = synthetic_split(dataset, n_test, seed=2 * len(name) + 1)
    dataset.write(root, train, test)
    return root
