"""Datasets: one record each (name, shape, classes, statistics, files, download, augmentation,
training defaults), their registry, and the datasets normcli knows. Everything else asks the
record; a new dataset of a known file format is one entry at the end of this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normcli.data.batching import Augment, Split
from normcli.data.formats import (
    cifar_records,
    read_cifar_bin,
    read_cifar_py,
    read_idx_split,
    write_idx,
)
from normcli.errors import NormcliError


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
        return read_idx_split(image_path, label_path, self.num_classes)

    def write(self, root: Path, train: Split, test: Split, *, compress: bool = False) -> None:
        """Write two splits as this dataset's official IDX files (gzipped with `compress`)."""
        folder = self.download_root(root)
        folder.mkdir(parents=True, exist_ok=True)
        names = iter(self.files)
        for split in (train, test):
            for array in (split.images[:, 0], split.labels.to(torch.uint8)):
                write_idx(folder / next(names), array, compress=compress)

    def where(self, root: Path) -> str:
        also = f" or {root}/" if self.search_root else ""
        return f"{self.download_root(root)}/{also} ({self.files[0]}[.gz] and the 3 other IDX files)"


def _concat(parts: list[Split]) -> Split:
    """The splits one after the other (a dataset's training files, in order)."""
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


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
                records = cifar_records(
                    split.images[part], split.labels[part], label_bytes=self.label_bytes
                )
                (folder / name).write_bytes(records)

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
