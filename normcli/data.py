"""Datasets: specs and constants, official-format file readers, download, batched augmentation.

Whole splits live in memory as uint8 tensors on the training device; batches are
sliced from them and augmented as whole batches with tensor ops (no PIL, no
DataLoader workers: on a 2-core machine those cost more than the model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import math
import os
import pickle
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from normcli.errors import NormcliError

DATA_ENV = "NORMCLI_DATA"


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


def normalize(images: torch.Tensor, spec: Dataset) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float32 normalized with the dataset's mean/std."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor, spec: Dataset) -> torch.Tensor:
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


# ---------------------------------------------------------------------------
# File readers: the official formats, each refusing malformed content in one line
# ---------------------------------------------------------------------------

_IDX_MAGIC_UBYTE = 0x08
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


def _check_labels(labels: torch.Tensor, path: Path, num_classes: int) -> None:
    """Every label must be a class index 0..num_classes-1."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        top = int(labels.max())
        bad = top if top >= num_classes else int(labels.min())
        raise NormcliError(f"{path}: label {bad} out of range 0-{num_classes - 1}")


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
    if 0 in shape:
        raise NormcliError(f"{path}: the IDX header declares an empty array {shape}")
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise NormcliError(
            f"{path}: wrong size, {len(raw)} bytes where the header promises {expected}"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def idx_bytes(data: torch.Tensor) -> bytes:
    """A uint8 tensor as an IDX file: bytes 0, 0, 0x08, ndim; big-endian sizes; the data."""
    header = bytes([0, 0, _IDX_MAGIC_UBYTE, data.ndim])
    header += b"".join(d.to_bytes(4, "big") for d in data.shape)
    return header + data.contiguous().numpy().tobytes()


def read_cifar_bin(
    path: str | os.PathLike[str], *, label_bytes: int = 1, num_classes: int = 10
) -> Split:
    """Read one CIFAR binary batch: records of `label_bytes` label bytes (the last one is the
    label: CIFAR-100 stores coarse, then fine) and 3072 pixel bytes (1024 R, G, B)."""
    path = Path(path)
    raw = _read_bytes(path)
    record = label_bytes + _CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % record:
        raise NormcliError(
            f"{path}: wrong size, {len(raw)} bytes is not a whole number of "
            f"{record}-byte CIFAR records"
        )
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, record)
    labels = records[:, label_bytes - 1].long()
    _check_labels(labels, path, num_classes)
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).contiguous()
    return Split(images, labels)


_CIFAR_PIXELS = 3 * 32 * 32


class _CifarBatchUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR python batches contain: numpy arrays and dtypes."""

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


def unpickle_cifar_batch(path: Path, title: str = "CIFAR-10") -> dict:
    """The one place normcli unpickles: an official CIFAR python batch, restricted globals."""
    raw = _read_bytes(path)
    try:
        return _CifarBatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any malformed pickle is a data error, not a crash
        raise NormcliError(f"{path}: not a {title} python batch ({e})") from None


def read_cifar_py(
    path: str | os.PathLike[str],
    *,
    label_key: bytes = b"labels",
    num_classes: int = 10,
    title: str = "CIFAR-10",
) -> Split:
    """Read one CIFAR python batch: a dict with b'data' (N, 3072) uint8 and the labels under
    `label_key` (b'labels' for CIFAR-10, b'fine_labels' for CIFAR-100)."""
    path = Path(path)
    batch = unpickle_cifar_batch(path, title)
    try:
        data = torch.as_tensor(batch[b"data"])
        labels = torch.as_tensor(batch[label_key], dtype=torch.long)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise NormcliError(f"{path}: not a {title} python batch ({e})") from None
    if data.dtype != torch.uint8:
        raise NormcliError(f"{path}: pixel data of type {data.dtype}, expected uint8")
    _check_labels(labels, path, num_classes)
    shape_ok = data.ndim == 2 and data.shape[1] == _CIFAR_PIXELS and labels.ndim == 1
    if not shape_ok or data.shape[0] != labels.shape[0] or data.shape[0] == 0:
        raise NormcliError(f"{path}: unexpected {title} batch shape {tuple(data.shape)}")
    return Split(data.reshape(-1, 3, 32, 32).contiguous(), labels)


def _concat(parts: list[Split]) -> Split:
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


# ---------------------------------------------------------------------------
# Datasets: one record each; everything else asks the record
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One file of a dataset's download: its name, MD5 and the addresses to try in turn."""

    filename: str
    md5: str
    urls: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """Everything normcli knows about a dataset. Subclasses know a file format (how to find and
    read the files); instances are the datasets, registered in `DATASETS`."""

    name: str  # what users type: --dataset NAME
    title: str  # human name, for help and tables
    input_shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, pixel values in [0, 1]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    resources: tuple[Resource, ...]  # what `download` fetches (MD5-checked by torchvision)
    augment: Augment  # the training augmentation, applied to whole batches
    defaults: Mapping[str, Any]  # training defaults: epochs, batch_size, lr, weight_decay, ...
    norm_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per norm

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def training_defaults(self, norm: str) -> dict[str, Any]:
        """Training defaults for `norm` on this dataset."""
        return {**self.defaults, **self.norm_defaults.get(norm, {})}

    def read(self, root: Path, train: bool) -> Split:
        """One split from the files under ROOT; FileNotFoundError when they are not there."""
        raise NotImplementedError

    def write(self, root: Path, train: Split, test: Split) -> None:
        """Write two splits under ROOT in the files and layout `read` expects."""
        raise NotImplementedError

    def where(self, root: Path) -> str:
        """Where `read` looks, for error messages."""
        raise NotImplementedError

    def download_root(self, root: Path) -> Path:
        """The folder the resources are downloaded to and extracted in."""
        return root

    def download_paths(self, root: Path) -> tuple[Path, ...]:
        """The top-level paths a download creates under ROOT (removed again if it fails)."""
        return (self.download_root(root),)

    def download(self, root: Path) -> None:
        """Fetch and extract every resource with torchvision's MD5-checked utilities."""
        from torchvision.datasets.utils import download_and_extract_archive  # only when needed

        folder = self.download_root(root)
        for resource in self.resources:
            errors = []
            for url in resource.urls:
                try:
                    download_and_extract_archive(
                        url, str(folder), filename=resource.filename, md5=resource.md5
                    )
                    break
                except Exception as e:  # try the next mirror; report the last error
                    errors.append(e)
            else:
                raise errors[-1]


_IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class IdxDataset(Dataset):
    """The MNIST file format: four IDX files (plain or .gz) in ROOT/<folder>/raw/."""

    folder: str  # torchvision's folder name: ROOT/<folder>/raw/
    search_root: bool = False  # also look directly in ROOT (MNIST only, as before)
    files: tuple[str, ...] = _IDX_FILES  # training images, labels; test images, labels

    def download_root(self, root: Path) -> Path:
        return root / self.folder / "raw"

    def download_paths(self, root: Path) -> tuple[Path, ...]:
        return (root / self.folder,)

    def _find(self, root: Path, name: str) -> Path | None:
        raw = self.download_root(root)
        for folder in (raw, root) if self.search_root else (raw,):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def read(self, root: Path, train: bool) -> Split:
        image_name, label_name = self.files[:2] if train else self.files[2:]
        image_path, label_path = self._find(root, image_name), self._find(root, label_name)
        if image_path is None or label_path is None:
            raise FileNotFoundError(image_name if image_path is None else label_name)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise NormcliError(
                f"{image_path}: {tuple(images.shape)} images do not match "
                f"{tuple(labels.shape)} labels in {label_path}"
            )
        _check_labels(labels, label_path, self.num_classes)
        return Split(images.unsqueeze(1).contiguous(), labels.long())

    def write(self, root: Path, train: Split, test: Split, *, compress: bool = False) -> None:
        """Write two splits as this dataset's official IDX files (gzipped with `compress`)."""
        folder = self.download_root(root)
        folder.mkdir(parents=True, exist_ok=True)
        names = iter(self.files)
        for split in (train, test):
            for array in (split.images[:, 0], split.labels.to(torch.uint8)):
                raw = idx_bytes(array)
                name = next(names)
                if compress:
                    (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
                else:
                    (folder / name).write_bytes(raw)

    def where(self, root: Path) -> str:
        also = f" or {root}/" if self.search_root else ""
        return f"{self.download_root(root)}/{also} ({self.files[0]}[.gz] and the 3 other IDX files)"


@dataclass(frozen=True, kw_only=True)
class CifarDataset(Dataset):
    """The CIFAR file formats: the binary version in ROOT/<bin_folder>/, else the python
    version in ROOT/<py_folder>/ (read through the restricted unpickler)."""

    bin_folder: str
    bin_files: tuple[tuple[str, ...], tuple[str, ...]]  # (training files, test files)
    py_folder: str
    py_files: tuple[tuple[str, ...], tuple[str, ...]]
    label_bytes: int = 1  # label bytes per binary record; the last one is the label
    py_label_key: bytes = b"labels"

    def download_paths(self, root: Path) -> tuple[Path, ...]:
        return (*(root / r.filename for r in self.resources), root / self.py_folder)

    def read(self, root: Path, train: bool) -> Split:
        bins, pys = self.bin_files[not train], self.py_files[not train]
        bin_dir, py_dir = root / self.bin_folder, root / self.py_folder
        n = self.num_classes
        if all((bin_dir / name).is_file() for name in bins):
            return _concat([
                read_cifar_bin(bin_dir / name, label_bytes=self.label_bytes, num_classes=n)
                for name in bins
            ])  # fmt: skip
        if all((py_dir / name).is_file() for name in pys):
            return _concat([
                read_cifar_py(
                    py_dir / name, label_key=self.py_label_key, num_classes=n, title=self.title
                )
                for name in pys
            ])  # fmt: skip
        raise FileNotFoundError(bins[0])

    def write(self, root: Path, train: Split, test: Split) -> None:
        """Write two splits as this dataset's official binary files (the training split spread
        over the training files in order)."""
        folder = root / self.bin_folder
        folder.mkdir(parents=True, exist_ok=True)
        for split, names in ((train, self.bin_files[0]), (test, self.bin_files[1])):
            parts = torch.arange(len(split)).chunk(len(names))
            if len(parts) != len(names):
                raise ValueError(f"{self.name}: need at least {len(names)} images per split")
            for name, part in zip(names, parts, strict=True):
                images, labels = split.images[part], split.labels[part].to(torch.uint8)
                # CIFAR-100 records carry a coarse label first; written as 0 here.
                label_bytes = [torch.zeros_like(labels)] * (self.label_bytes - 1) + [labels]
                records = torch.cat([*(b[:, None] for b in label_bytes),
                                     images.reshape(len(part), -1)], 1)  # fmt: skip
                (folder / name).write_bytes(records.numpy().tobytes())

    def where(self, root: Path) -> str:
        bins = self.bin_files[0] + self.bin_files[1]
        return f"{root}/{self.bin_folder}/ ({bins[0]} ... {bins[-1]}) or {root}/{self.py_folder}/"


DATASETS: dict[str, Dataset] = {}


def register_dataset(dataset: Dataset) -> Dataset:
    """Add a dataset record; a duplicate name is an error."""
    if dataset.name in DATASETS:
        raise ValueError(f"dataset {dataset.name!r} is already registered")
    if len(dataset.mean) != dataset.input_shape[0] or len(dataset.std) != dataset.input_shape[0]:
        raise ValueError(f"dataset {dataset.name!r}: mean/std need one value per channel")
    DATASETS[dataset.name] = dataset
    return dataset


def get_dataset(name: str) -> Dataset:
    """The record of dataset `name`; a clear error lists the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise NormcliError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}") from None


# MNIST: batch 64 gives the 9k-parameter net twice the steps; LN needs them to pass 99.4% in
# the last epochs (measured: LN 99.44% at batch 128, 99.53% at 64).
_MNIST_DEFAULTS = {"epochs": 15, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "dropout": 0.0}
_LECUN = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


def _idx_resources(mirrors: tuple[str, ...], *md5s: str) -> tuple[Resource, ...]:
    """The four gzipped IDX files, in IdxDataset.files order, under each mirror."""
    names = [f"{n}.gz" for n in _IDX_FILES]
    return tuple(
        Resource(name, md5, tuple(m + name for m in mirrors))
        for name, md5 in zip(names, md5s, strict=True)
    )


MNIST = register_dataset(IdxDataset(
    name="mnist", title="MNIST", folder="MNIST", search_root=True,
    input_shape=(1, 28, 28), class_names=tuple("0123456789"),
    mean=(0.1307,), std=(0.3081,), train_size=60_000, test_size=10_000,
    resources=_idx_resources(
        _LECUN, "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c",
    ),
    augment=Augment(degrees=7.0, shift=2.0),
    defaults=_MNIST_DEFAULTS,
))  # fmt: skip

# Fashion-MNIST and KMNIST: MNIST's format, size and training recipe; their own files,
# classes and pixel statistics (training-set mean/std, as torchvision's references quote).
FASHION_MNIST = register_dataset(dataclasses.replace(
    MNIST, name="fashion_mnist", title="Fashion-MNIST", folder="FashionMNIST", search_root=False,
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    mean=(0.2860,), std=(0.3530,),
    resources=_idx_resources(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310",
    ),
))  # fmt: skip

KMNIST = register_dataset(dataclasses.replace(
    MNIST, name="kmnist", title="Kuzushiji-MNIST", folder="KMNIST", search_root=False,
    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    mean=(0.1918,), std=(0.3483,),
    resources=_idx_resources(
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        "bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134",
    ),
))  # fmt: skip

_TORONTO = "https://www.cs.toronto.edu/~kriz/"
_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

CIFAR10 = register_dataset(CifarDataset(
    name="cifar10", title="CIFAR-10",
    input_shape=(3, 32, 32),
    class_names=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    train_size=50_000, test_size=10_000,
    bin_folder="cifar-10-batches-bin",
    bin_files=(tuple(f"{n}.bin" for n in _CIFAR10_BATCHES), ("test_batch.bin",)),
    py_folder="cifar-10-batches-py", py_files=(_CIFAR10_BATCHES, ("test_batch",)),
    resources=(Resource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                        (_TORONTO + "cifar-10-python.tar.gz",)),),
    augment=Augment(crop_padding=2, flip=True),
    # The 50k-parameter net underfits in 20 epochs (batch 128, 4 px crops, weight decay 5e-4:
    # BN + L1 80.6%, train accuracy 81.9%), so fit more: 2 px crops, a tenth of the weight
    # decay, and more steps (batch 32). BatchNorm normalizes with the statistics of its batch,
    # which get noisier as the batch shrinks; the batch-free norms only gain the extra steps.
    # Measured from batch 64 to 32: BN + L1 82.11% -> 81.36%, GN 80.30% -> 80.52%, LN 79.70%
    # -> 81.21% (bench/results/cifar10_tuning): BN keeps batch 64.
    defaults={"epochs": 20, "batch_size": 32, "lr": 0.1, "weight_decay": 5e-5, "dropout": 0.0},
    norm_defaults={"bn": {"batch_size": 64}},
))  # fmt: skip

# The fine labels, in label order (fine_label_names.txt of the binary version).
_CIFAR100_FINE = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange
orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm
"""
CIFAR100_CLASSES = tuple(_CIFAR100_FINE.split())

# CIFAR-100: CIFAR-10's images, recipe and augmentation; 100 fine classes, two label bytes per
# binary record (coarse, fine), one training and one test file.
CIFAR100 = register_dataset(dataclasses.replace(
    CIFAR10, name="cifar100", title="CIFAR-100", class_names=CIFAR100_CLASSES,
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    bin_folder="cifar-100-binary", bin_files=(("train.bin",), ("test.bin",)), label_bytes=2,
    py_folder="cifar-100-python", py_files=(("train",), ("test",)), py_label_key=b"fine_labels",
    resources=(Resource("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                        (_TORONTO + "cifar-100-python.tar.gz",)),),
))  # fmt: skip


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


def download(name: str, root: Path) -> None:
    """Fetch dataset `name`'s official archives (MD5-checked by torchvision).

    A failed download leaves nothing behind: folders and files it created are removed.
    """
    dataset = get_dataset(name)
    before = _existing(root, dataset)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints progress; stdout is data
            root.mkdir(parents=True, exist_ok=True)
            dataset.download(root)
    except BaseException:
        _remove_new(_existing(root, dataset) - before)
        raise


def _existing(root: Path, dataset: Dataset) -> set[Path]:
    """The data folder, its ancestors, and everything under the paths a download writes."""
    found = {p for p in (root, *root.parents) if p.exists()}
    for path in dataset.download_paths(root):
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
    dataset = get_dataset(name)
    root = resolve_data_dir(data_dir)
    if limit is not None and limit <= 0:
        raise NormcliError(f"limit must be a positive number of images, got {limit}")
    try:
        split = dataset.read(root, train)
    except FileNotFoundError:
        where = dataset.where(root)
        if not download_missing:
            raise NormcliError(
                f"{name} not found: looked in {where}; put the files there or "
                f"point --data-dir / ${DATA_ENV} at them"
            ) from None
        try:
            download(name, root)
            split = dataset.read(root, train)
        except NormcliError:
            raise
        except Exception as e:  # offline, refused, bad checksum: all end the same way
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(e).__name__
            raise NormcliError(
                f"{name} not found in {where}, and the download failed ({reason}); "
                f"put the official files there or point --data-dir / ${DATA_ENV} at them"
            ) from None
    if tuple(split.images.shape[1:]) != dataset.input_shape:
        raise NormcliError(f"{name}: images of shape {tuple(split.images.shape[1:])}")
    return split.head(limit)


# ---------------------------------------------------------------------------
# Batches, on whatever device the split lives on
# ---------------------------------------------------------------------------


def batches(
    split: Split,
    spec: Dataset,
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
