"""Shared fixtures: tiny datasets in the official file formats, a CLI runner, tiny checkpoints."""

from __future__ import annotations

import gzip
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from normcli.cli import main

TINY_TRAIN = 200
TINY_TEST = 100


def make_images(
    n: int, shape: tuple[int, int, int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable uint8 images: class k has a bright square at a class-specific place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    c, h, w = shape
    images = torch.randint(0, 60, (n, c, h, w), generator=g, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, col = 2 + (k // 5) * (h // 2), 2 + (k % 5) * (w // 6)
        images[i, :, r : r + h // 3, col : col + 4] = 230
    return images, labels


def write_idx(path: Path, data: torch.Tensor, compress: bool = False) -> Path:
    """Write a uint8 tensor as an IDX file (optionally gzipped), as the MNIST files are."""
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(struct.pack(">I", d) for d in data.shape)
    raw = header + data.contiguous().numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist(root: Path, n_train: int = TINY_TRAIN, n_test: int = TINY_TEST) -> Path:
    """Tiny MNIST in ROOT/MNIST/raw/ (official IDX names, uncompressed)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for train, n, prefix in ((True, n_train, "train"), (False, n_test, "t10k")):
        images, labels = make_images(n, (1, 28, 28), seed=int(train))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def cifar_records(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """CIFAR-10 binary records: label byte, then 1024 R, 1024 G, 1024 B bytes."""
    flat = images.reshape(len(labels), -1)
    return torch.cat([labels.to(torch.uint8)[:, None], flat], 1).numpy().tobytes()


def write_cifar(root: Path, n_train: int = TINY_TRAIN, n_test: int = TINY_TEST) -> Path:
    """Tiny CIFAR-10 in ROOT/cifar-10-batches-bin/ (5 training batches + test batch)."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(n_train, (3, 32, 32), seed=2)
    for i, part in enumerate(torch.arange(n_train).chunk(5), start=1):
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records(images[part], labels[part]))
    images, labels = make_images(n_test, (3, 32, 32), seed=3)
    (folder / "test_batch.bin").write_bytes(cifar_records(images, labels))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with tiny MNIST and CIFAR-10 in the official layouts."""
    root = tmp_path_factory.mktemp("data")
    write_mnist(root)
    write_cifar(root)
    return root


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> CliResult:
    """Run `normcli ARGS` in-process: Typer's CliRunner isolation around the real entry point."""
    runner = CliRunner()
    with runner.isolation(env=env) as (out, err, _):
        code = main([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return CliResult(code, stdout, stderr)


@pytest.fixture
def cli():
    return run_cli


def train_tiny(data: Path, out: Path, *extra: str, dataset: str = "mnist") -> Path:
    """Train a tiny 2-epoch model through the CLI; returns the checkpoint path."""
    result = run_cli(
        "train", "--dataset", dataset, "--data-dir", data, "--epochs", "2",
        "--batch-size", "32", "--device", "cpu", "--out", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints trained on the tiny data: mnist bn+L1, gn, ln and one cifar10 bn."""
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "bn_l1": train_tiny(
            tiny_data, folder / "bn_l1.safetensors", "--norm", "bn", "--l1", "1e-4"
        ),
        "gn": train_tiny(tiny_data, folder / "gn.safetensors", "--norm", "gn", "--groups", "2"),
        "ln": train_tiny(tiny_data, folder / "ln.safetensors", "--norm", "ln"),
        "cifar": train_tiny(tiny_data, folder / "cifar.safetensors", dataset="cifar10"),
    }
