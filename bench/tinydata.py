"""Tiny MNIST and CIFAR-10 in the official file layouts, for smoke runs of the benchmarks.

The files are the ones both normcli and torchvision read: MNIST as the four
uncompressed IDX files in ROOT/MNIST/raw/, CIFAR-10 as the binary batches in
ROOT/cifar-10-batches-bin/. Pixels are random noise: good for timing code paths,
useless for learning anything.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN_BATCHES = 5


def random_split(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random uint8 images of `shape` and labels 0-9, every class present when n >= 10."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)].to(torch.uint8)
    return images, labels


def idx_bytes(data: torch.Tensor) -> bytes:
    """A uint8 tensor as an IDX file: bytes 0, 0, 0x08, ndim; big-endian sizes; the data."""
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(struct.pack(">I", d) for d in data.shape)
    return header + data.contiguous().numpy().tobytes()


def write_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Tiny MNIST in ROOT/MNIST/raw/ under the official (uncompressed) IDX names."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for i, (prefix, n) in enumerate((("train", n_train), ("t10k", n_test))):
        images, labels = random_split(n, (28, 28), seed + i)
        image_name, label_name = MNIST_FILES[prefix]
        (raw / image_name).write_bytes(idx_bytes(images))
        (raw / label_name).write_bytes(idx_bytes(labels))
    return root


def cifar_records(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """CIFAR-10 binary records: 1 label byte, then 1024 R, 1024 G, 1024 B bytes."""
    flat = images.reshape(len(labels), -1)
    return torch.cat([labels[:, None], flat], 1).numpy().tobytes()


def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Tiny CIFAR-10 in ROOT/cifar-10-batches-bin/: data_batch_1..5.bin and test_batch.bin."""
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = random_split(n_train, (3, 32, 32), seed)
    parts = torch.arange(n_train).chunk(CIFAR_TRAIN_BATCHES)
    if len(parts) != CIFAR_TRAIN_BATCHES:
        raise ValueError(f"need at least {CIFAR_TRAIN_BATCHES} training images, got {n_train}")
    for i, part in enumerate(parts, start=1):
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records(images[part], labels[part]))
    images, labels = random_split(n_test, (3, 32, 32), seed + 1)
    (folder / "test_batch.bin").write_bytes(cifar_records(images, labels))
    return root


WRITERS = {"mnist": write_mnist, "cifar10": write_cifar10}


def write_tiny(root: Path, dataset: str, n_train: int = 256, n_test: int = 128) -> Path:
    """Write tiny `dataset` ('mnist' or 'cifar10') under ROOT; returns ROOT."""
    return WRITERS[dataset](root, n_train, n_test)
