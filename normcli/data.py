"""Datasets: specs and constants, official-format file readers, download, batched augmentation.

Whole splits live in memory as uint8 tensors on the training device; batches are
sliced from them and augmented as whole batches with tensor ops (no PIL, no
DataLoader workers: on a 2-core machine those cost more than the model).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import pickle
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from normcli.errors import NormcliError

DATA_ENV = "NORMCLI_DATA"

MNIST_CLASSES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset: shape, classes, normalization constants."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, pixel values in [0, 1]
    std: tuple[float, ...]
    train_size: int
    test_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", (1, 28, 28), MNIST_CLASSES, (0.1307,), (0.3081,), 60_000, 10_000),
    "cifar10": DatasetSpec(
        "cifar10",
        (3, 32, 32),
        CIFAR10_CLASSES,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        50_000,
        10_000,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset `name`; a clear error lists the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise NormcliError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}") from None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: the argument, else $NORMCLI_DATA, else ./data."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path("data")


@dataclass
class Split:
    """One dataset split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def head(self, limit: int | None) -> Split:
        """The first `limit` examples (all of them when `limit` is None)."""
        if limit is None:
            return self
        return Split(self.images[:limit], self.labels[:limit])


# ---------------------------------------------------------------------------
# MNIST: the official IDX files
# ---------------------------------------------------------------------------

_IDX_MAGIC_UBYTE = 0x08
MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# The largest official file is 47 MB (MNIST training images, unpacked): refuse far bigger
# ones (or gzip bombs) before reading them into memory.
MAX_DATA_FILE_BYTES = 256 * 1024**2


def _read_bytes(path: Path) -> bytes:
    """A data file's bytes (gunzipped for .gz); unreadable files are a clean error."""
    try:
        if path.suffix == ".gz":
            try:
                with gzip.open(path, "rb") as f:
                    raw = f.read(MAX_DATA_FILE_BYTES + 1)
            except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
                raise NormcliError(f"{path}: not a valid gzip file ({e})") from None
        else:
            size = path.stat().st_size
            if size > MAX_DATA_FILE_BYTES:
                raise NormcliError(f"{path}: {size} bytes, too large for a data file")
            raw = path.read_bytes()
    except OSError as e:
        raise NormcliError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_DATA_FILE_BYTES:
        raise NormcliError(f"{path}: unpacks to more than {MAX_DATA_FILE_BYTES} bytes")
    return raw


def _check_labels(labels: torch.Tensor, path: Path) -> None:
    """Every label must be a class index 0-9."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        bad = int(labels.max()) if int(labels.max()) > 9 else int(labels.min())
        raise NormcliError(f"{path}: label {bad} out of range 0-9")


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (plain or .gz) into a uint8 tensor."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_MAGIC_UBYTE:
        raise NormcliError(f"{path}: wrong magic number, not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise NormcliError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise NormcliError(
            f"{path}: wrong size, {len(raw)} bytes where the header promises {expected}"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def _find_mnist_file(root: Path, name: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(root: Path, train: bool) -> Split:
    """MNIST split from the IDX files in ROOT/MNIST/raw or ROOT."""
    image_name, label_name = MNIST_FILES[train]
    image_path = _find_mnist_file(root, image_name)
    label_path = _find_mnist_file(root, label_name)
    if image_path is None or label_path is None:
        raise FileNotFoundError(image_name if image_path is None else label_name)
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise NormcliError(
            f"{image_path}: {tuple(images.shape)} images do not match "
            f"{tuple(labels.shape)} labels in {label_path}"
        )
    _check_labels(labels, label_path)
    return Split(images.unsqueeze(1).contiguous(), labels.long())


# ---------------------------------------------------------------------------
# CIFAR-10: the official binary batches, or the official python batches
# ---------------------------------------------------------------------------

CIFAR_BIN_DIR = "cifar-10-batches-bin"
CIFAR_PY_DIR = "cifar-10-batches-py"
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def read_cifar_bin(path: str | os.PathLike[str]) -> Split:
    """Read one CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise NormcliError(
            f"{path}: wrong size, {len(raw)} bytes is not a whole number of "
            f"{_CIFAR_RECORD}-byte CIFAR-10 records"
        )
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].long()
    _check_labels(labels, path)
    images = records[:, 1:].reshape(-1, 3, 32, 32).contiguous()
    return Split(images, labels)


class _CifarBatchUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR-10 python batches contain: numpy arrays and dtypes."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def unpickle_cifar_batch(path: Path) -> dict:
    """The one place normcli unpickles: an official CIFAR-10 python batch, restricted globals."""
    raw = _read_bytes(path)
    try:
        return _CifarBatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any malformed pickle is a data error, not a crash
        raise NormcliError(f"{path}: not a CIFAR-10 python batch ({e})") from None


def read_cifar_py(path: str | os.PathLike[str]) -> Split:
    """Read one CIFAR-10 python batch (dict with b'data' (N, 3072) uint8 and b'labels')."""
    path = Path(path)
    batch = unpickle_cifar_batch(path)
    try:
        data = torch.as_tensor(batch[b"data"])
        labels = torch.as_tensor(batch[b"labels"], dtype=torch.long)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise NormcliError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if data.dtype != torch.uint8:
        raise NormcliError(f"{path}: pixel data of type {data.dtype}, expected uint8")
    _check_labels(labels, path)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise NormcliError(f"{path}: unexpected CIFAR-10 batch shape {tuple(data.shape)}")
    return Split(data.reshape(-1, 3, 32, 32).contiguous(), labels)


def load_cifar10(root: Path, train: bool) -> Split:
    """CIFAR-10 split from ROOT/cifar-10-batches-bin, else ROOT/cifar-10-batches-py."""
    names = _CIFAR_TRAIN if train else _CIFAR_TEST
    bin_dir, py_dir = root / CIFAR_BIN_DIR, root / CIFAR_PY_DIR
    if all((bin_dir / f"{n}.bin").is_file() for n in names):
        parts = [read_cifar_bin(bin_dir / f"{n}.bin") for n in names]
    elif all((py_dir / n).is_file() for n in names):
        parts = [read_cifar_py(py_dir / n) for n in names]
    else:
        raise FileNotFoundError(names[0])
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


_LOADERS = {"mnist": load_mnist, "cifar10": load_cifar10}
_WHERE = {
    "mnist": "{root}/MNIST/raw/ or {root}/ "
    "(train-images-idx3-ubyte[.gz] and the 3 other IDX files)",
    "cifar10": "{root}/cifar-10-batches-bin/ (data_batch_1.bin ... test_batch.bin) "
    "or {root}/cifar-10-batches-py/",
}


# What torchvision's downloaders create under the data folder, per dataset.
_DOWNLOAD_PATHS = {
    "mnist": ("MNIST",),
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
}


def download(name: str, root: Path) -> None:
    """Fetch the official archives with torchvision's MD5-checked download utilities.

    A failed download leaves nothing behind: folders and files it created are removed.
    """
    from torchvision import datasets  # imported lazily: only needed when files are missing

    before = _existing(root, name)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints progress; stdout is data
            root.mkdir(parents=True, exist_ok=True)
            if name == "mnist":
                datasets.MNIST(str(root), train=True, download=True)
            else:
                datasets.CIFAR10(str(root), train=True, download=True)
    except BaseException:
        _remove_new(_existing(root, name) - before)
        raise


def _existing(root: Path, name: str) -> set[Path]:
    """The data folder, its ancestors, and everything under the paths a download writes."""
    found = {p for p in (root, *root.parents) if p.exists()}
    for top in _DOWNLOAD_PATHS[name]:
        path = root / top
        if path.exists() or path.is_symlink():
            found.add(path)
        if path.is_dir() and not path.is_symlink():
            found.update(path.rglob("*"))
    return found


def _remove_new(paths: set[Path]) -> None:
    """Delete what a failed download created, deepest paths first (files, then folders)."""
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()


def load_split(
    name: str,
    train: bool,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    download_missing: bool = True,
) -> Split:
    """Load a whole split of dataset `name` into memory (CPU), downloading it if missing."""
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    if limit is not None and limit <= 0:
        raise NormcliError(f"--limit must be a positive number of images, got {limit}")
    try:
        split = _LOADERS[name](root, train)
    except FileNotFoundError:
        where = _WHERE[name].format(root=root)
        if not download_missing:
            raise NormcliError(
                f"{name} not found: looked in {where}; put the files there or "
                f"point --data-dir / ${DATA_ENV} at them"
            ) from None
        try:
            download(name, root)
            split = _LOADERS[name](root, train)
        except NormcliError:
            raise
        except Exception as e:  # offline, refused, bad checksum: all end the same way
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(e).__name__
            raise NormcliError(
                f"{name} not found in {where}, and the download failed ({reason}); "
                f"put the official files there or point --data-dir / ${DATA_ENV} at them"
            ) from None
    if tuple(split.images.shape[1:]) != spec.input_shape:
        raise NormcliError(f"{name}: images of shape {tuple(split.images.shape[1:])}")
    return split.head(limit)


# ---------------------------------------------------------------------------
# Batches and augmentation, on whatever device the split lives on
# ---------------------------------------------------------------------------


def normalize(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float32 normalized with the dataset's mean/std."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Undo `normalize`: back to [0, 1] pixel values."""
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def random_affine(
    x: torch.Tensor, max_degrees: float, max_shift: float, generator: torch.Generator
) -> torch.Tensor:
    """Rotate each image by U(-deg, deg) and translate by U(-shift, shift) pixels; zero fill."""
    n, _, h, w = x.shape
    dev = x.device
    angle = (torch.rand(n, generator=generator, device=dev) * 2 - 1) * math.radians(max_degrees)
    shift = (torch.rand(n, 2, generator=generator, device=dev) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, 0, 2] = shift[:, 0] * 2 / w  # pixels -> normalized [-1, 1] coordinates
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_crop_flip(
    x: torch.Tensor, padding: int, generator: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """Random crop of each image from a zero-padded copy, then horizontal flip with p=0.5."""
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]
    cols = torch.arange(w, device=dev)[None, :] + dx[:, None]
    if flip:
        mirror = torch.rand(n, generator=generator, device=dev) < 0.5
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

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch of [0, 1] float images."""
        if self.degrees or self.shift:
            x = random_affine(x, self.degrees, self.shift, generator)
        if self.crop_padding or self.flip:
            x = random_crop_flip(x, self.crop_padding, generator, flip=self.flip)
        return x


DEFAULT_AUGMENT = {
    "mnist": Augment(degrees=7.0, shift=2.0),
    "cifar10": Augment(crop_padding=2, flip=True),
}


def batches(
    split: Split,
    spec: DatasetSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalized float images, labels) batches sliced from an in-memory split."""
    n = len(split)
    dev = split.images.device
    if shuffle:
        order = torch.randperm(n, generator=generator, device=dev)
    for start in range(0, n, batch_size):
        if shuffle:
            idx = order[start : start + batch_size]
            images, labels = split.images[idx], split.labels[idx]
        else:
            images = split.images[start : start + batch_size]
            labels = split.labels[start : start + batch_size]
        x = images.float().div_(255.0)
        if augment is not None and augment.active:
            x = augment(x, generator)
        yield normalize(x, spec), labels
