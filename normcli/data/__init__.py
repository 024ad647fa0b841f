"""Datasets: their records (records), the official file formats (formats), the data folder and
download (loading), splits in memory and their augmented batches (batching), and tiny
official-format files for tests and benches (synthetic).

Import from here: the submodules are how the package is laid out, not its API.
"""

from normcli.data.batching import (
    Augment,
    Part,
    Split,
    batches,
    denormalize,
    normalize,
    random_affine,
    random_crop_flip,
)
from normcli.data.formats import (
    MAX_DATA_FILE_BYTES,
    cifar_records,
    idx_bytes,
    read_cifar_bin,
    read_cifar_py,
    read_idx,
    read_idx_split,
    unpickle_cifar_batch,
    write_idx,
)
from normcli.data.loading import DATA_ENV, download, load_split, prepare, resolve_data_dir
from normcli.data.records import (
    CIFAR10,
    CIFAR100,
    CIFAR100_CLASSES,
    DATASETS,
    FASHION_MNIST,
    KMNIST,
    MNIST,
    CifarDataset,
    Dataset,
    IdxDataset,
    Resource,
    get_dataset,
    register_dataset,
)
from normcli.data.synthetic import synthetic_split, write_synthetic

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CIFAR100_CLASSES",
    "DATASETS",
    "DATA_ENV",
    "FASHION_MNIST",
    "KMNIST",
    "MAX_DATA_FILE_BYTES",
    "MNIST",
    "Augment",
    "CifarDataset",
    "Dataset",
    "IdxDataset",
    "Part",
    "Resource",
    "Split",
    "batches",
    "cifar_records",
    "denormalize",
    "download",
    "get_dataset",
    "idx_bytes",
    "load_split",
    "prepare",
    "normalize",
    "random_affine",
    "random_crop_flip",
    "read_cifar_bin",
    "read_cifar_py",
    "read_idx",
    "read_idx_split",
    "register_dataset",
    "resolve_data_dir",
    "synthetic_split",
    "unpickle_cifar_batch",
    "write_idx",
    "write_synthetic",
]
