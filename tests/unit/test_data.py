"""Data: IDX and CIFAR-10 readers on files written here in the official formats,
the data-folder resolution, --limit, and the batched augmentation."""

from __future__ import annotations

import builtins
import gzip
import io
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normcli import data
from normcli.data import (
    Augment,
    batches,
    cifar_records,
    denormalize,
    get_dataset,
    load_split,
    normalize,
    random_affine,
    random_crop_flip,
    read_cifar_bin,
    read_cifar_py,
    read_idx,
    resolve_data_dir,
    write_idx,
)
from normcli.errors import NormcliError


def _random_uint8(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _random_labels(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, 10, (n,), generator=g)


# ---------------------------------------------------------------------------
# IDX (MNIST)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (2, 3, 4, 5)])
def test_read_idx_returns_the_bytes_written(tmp_path: Path, compress: bool, shape) -> None:
    written = _random_uint8(shape, seed=len(shape))
    path = write_idx(tmp_path / "x-idx-ubyte", written, compress=compress)
    assert path.name.endswith(".gz") == compress

    got = read_idx(path)

    assert got.dtype == torch.uint8
    assert tuple(got.shape) == shape
    assert torch.equal(got, written)


def test_read_idx_header_is_big_endian(tmp_path: Path) -> None:
    # Hand-made file, not via write_idx: 2 x 3 matrix, dimensions as big-endian uint32.
    raw = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    (tmp_path / "m").write_bytes(raw)
    assert read_idx(tmp_path / "m").tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + b"\0" * 8,  # float IDX, not ubyte
        bytes([1, 2, 0x08, 1]) + struct.pack(">I", 2) + b"\0\0",  # bad magic
        bytes([0, 0, 0x08, 2]) + struct.pack(">I", 2),  # header cut short
        bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"\0\0",  # data cut short
        bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2) + b"\0\0\0",  # trailing bytes
    ],
    ids=["empty", "float", "magic", "header", "short", "long"],
)
def test_read_idx_refuses_malformed_files(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bad-idx-ubyte"
    path.write_bytes(raw)
    with pytest.raises(NormcliError, match="bad-idx-ubyte"):
        read_idx(path)


def test_read_idx_refuses_a_broken_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x02ab")[:-6])
    with pytest.raises(NormcliError, match="gzip"):
        read_idx(path)


def _write_mnist_files(folder: Path, compress: bool, n_train: int = 30, n_test: int = 20) -> dict:
    """All four official MNIST files in `folder`; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for train, n, prefix in ((True, n_train, "train"), (False, n_test, "t10k")):
        images = _random_uint8((n, 28, 28), seed=n)
        labels = _random_labels(n, seed=n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8), compress=compress)
        written[train] = (images, labels)
    return written


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["MNIST/raw", "."])
def test_load_mnist_pixels_and_labels_equal_the_files(
    tmp_path: Path, layout: str, compress: bool
) -> None:
    written = _write_mnist_files(tmp_path / layout, compress)
    for train in (True, False):
        split = load_split("mnist", train, tmp_path, download_missing=False)
        images, labels = written[train]
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert tuple(split.images.shape) == (len(labels), 1, 28, 28)
        assert torch.equal(split.images[:, 0], images)
        assert torch.equal(split.labels, labels)


def test_load_mnist_missing_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NormcliError) as err:
        load_split("mnist", True, tmp_path, download_missing=False)
    assert str(tmp_path) in str(err.value)
    assert "train-images-idx3-ubyte" in str(err.value)


def test_load_mnist_refuses_images_and_labels_of_different_counts(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist_files(raw, compress=False)
    write_idx(raw / "train-labels-idx1-ubyte", torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(NormcliError, match="labels"):
        load_split("mnist", True, tmp_path, download_missing=False)


# ---------------------------------------------------------------------------
# CIFAR-10 binary batches
# ---------------------------------------------------------------------------


def test_read_cifar_bin_channel_layout(tmp_path: Path) -> None:
    # Hand-made records: label byte, then 1024 R, 1024 G, 1024 B bytes (row-major 32 x 32).
    red = bytes(range(256)) * 4
    record0 = bytes([7]) + red + bytes([20]) * 1024 + bytes([30]) * 1024
    record1 = bytes([0]) + bytes([1]) * 1024 + bytes([2]) * 1024 + bytes(range(256)) * 4
    (tmp_path / "b.bin").write_bytes(record0 + record1)

    split = read_cifar_bin(tmp_path / "b.bin")

    assert split.labels.tolist() == [7, 0]
    assert split.labels.dtype == torch.int64
    assert split.images.dtype == torch.uint8
    assert tuple(split.images.shape) == (2, 3, 32, 32)
    assert split.images[0, 0].flatten().tolist() == list(red)
    assert split.images[0, 0, 0, :3].tolist() == [0, 1, 2]
    assert split.images[0, 0, 1, 0].item() == 32  # second row starts at byte 32
    assert (split.images[0, 1] == 20).all() and (split.images[0, 2] == 30).all()
    assert (split.images[1, 0] == 1).all() and (split.images[1, 1] == 2).all()


@pytest.mark.parametrize("size", [0, 3073 * 2 - 1, 3073 + 1])
def test_read_cifar_bin_refuses_partial_records(tmp_path: Path, size: int) -> None:
    (tmp_path / "b.bin").write_bytes(b"\0" * size)
    with pytest.raises(NormcliError, match="b.bin"):
        read_cifar_bin(tmp_path / "b.bin")


def _cifar_parts(n_per_batch: int = 6) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        name: (_random_uint8((n_per_batch, 3, 32, 32), seed=i), _random_labels(n_per_batch, i))
        for i, name in enumerate(names)
    }


def _check_cifar_splits(root: Path, parts: dict) -> None:
    train = load_split("cifar10", True, root, download_missing=False)
    test = load_split("cifar10", False, root, download_missing=False)
    order = [f"data_batch_{i}" for i in range(1, 6)]  # training batches in their numbered order
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.equal(train.images, torch.cat([parts[n][0] for n in order]))
    assert torch.equal(train.labels, torch.cat([parts[n][1] for n in order]))
    assert torch.equal(test.images, parts["test_batch"][0])
    assert torch.equal(test.labels, parts["test_batch"][1])


def test_load_cifar10_binary_batches(tmp_path: Path) -> None:
    parts = _cifar_parts()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name, (images, labels) in parts.items():
        (folder / f"{name}.bin").write_bytes(cifar_records(images, labels))
    _check_cifar_splits(tmp_path, parts)


def test_load_cifar10_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NormcliError, match="cifar-10-batches"):
        load_split("cifar10", False, tmp_path, download_missing=False)


# ---------------------------------------------------------------------------
# CIFAR-10 python batches (pickles) and the restricted unpickler
# ---------------------------------------------------------------------------


def _py_batch(images: torch.Tensor, labels: torch.Tensor, protocol: int) -> bytes:
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": labels.tolist(),
        b"data": images.reshape(len(labels), 3072).numpy().astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=protocol)


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: str opcodes, numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_batch(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": labels.tolist(),
        b"data": images.reshape(len(labels), 3072).numpy(),
    }
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(batch)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [3, 4])
def test_read_cifar_py_reads_a_pickled_batch(tmp_path: Path, protocol: int) -> None:
    images, labels = _random_uint8((5, 3, 32, 32), seed=5), _random_labels(5, seed=5)
    (tmp_path / "data_batch_1").write_bytes(_py_batch(images, labels, protocol))

    split = read_cifar_py(tmp_path / "data_batch_1")

    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert torch.equal(split.images, images)
    assert torch.equal(split.labels, labels)


def test_read_cifar_py_reads_a_python2_style_batch(tmp_path: Path) -> None:
    raw = _py2_batch(_random_uint8((4, 3, 32, 32), seed=9), _random_labels(4, seed=9))
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw  # really the old format
    assert b"_codecs" not in raw
    (tmp_path / "test_batch").write_bytes(raw)

    split = read_cifar_py(tmp_path / "test_batch")

    assert torch.equal(split.images, _random_uint8((4, 3, 32, 32), seed=9))
    assert torch.equal(split.labels, _random_labels(4, seed=9))


def test_load_cifar10_python_batches(tmp_path: Path) -> None:
    parts = _cifar_parts()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, (images, labels) in parts.items():
        (folder / name).write_bytes(_py_batch(images, labels, protocol=4))
    _check_cifar_splits(tmp_path, parts)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil", [_RunsShell, _RunsExec])
@pytest.mark.parametrize("where", ["data", "labels"])
def test_read_cifar_py_refuses_forbidden_globals_without_running_them(
    tmp_path: Path, evil: type, where: str
) -> None:
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    payload[f"{where}".encode()] = evil(marker)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=4))

    with pytest.raises(NormcliError, match="test_batch"):
        read_cifar_py(folder / "test_batch")
    with pytest.raises(NormcliError):
        load_split("cifar10", False, tmp_path, download_missing=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "raw", [b"", b"not a pickle", pickle.dumps([1, 2, 3]), pickle.dumps({b"data": 1})[:-3]]
)
def test_read_cifar_py_refuses_malformed_pickles(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "data_batch_1").write_bytes(raw)
    with pytest.raises(NormcliError, match="data_batch_1"):
        read_cifar_py(tmp_path / "data_batch_1")


def test_read_cifar_py_refuses_wrong_shapes(tmp_path: Path) -> None:
    batch = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(NormcliError, match="data_batch_1"):
        read_cifar_py(tmp_path / "data_batch_1")


def _write_bad_label(tmp_path: Path, reader: str) -> Path:
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([3, 10])
    if reader == "mnist":
        _write_mnist_files(tmp_path / "MNIST" / "raw", compress=False)
        labels = torch.full((20,), 12, dtype=torch.uint8)
        write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", labels)
        return tmp_path
    if reader == "bin":
        path = tmp_path / "test_batch.bin"
        path.write_bytes(cifar_records(images, labels))
        return path
    path = tmp_path / "test_batch"
    path.write_bytes(_py_batch(images, labels, protocol=4))
    return path


@pytest.mark.parametrize("reader", ["mnist", "bin", "py"])
def test_every_reader_refuses_labels_outside_0_to_9(tmp_path: Path, reader: str) -> None:
    # A label of 10 or more would only surface later, inside cross_entropy, as an internal error.
    path = _write_bad_label(tmp_path, reader)
    read = {
        "mnist": lambda p: load_split("mnist", False, p, download_missing=False),
        "bin": read_cifar_bin,
        "py": read_cifar_py,
    }[reader]
    with pytest.raises(NormcliError, match="out of range|label"):
        read(path)


# ---------------------------------------------------------------------------
# Data folder and --limit
# ---------------------------------------------------------------------------


def test_data_dir_argument_beats_environment_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert resolve_data_dir() == Path("data")
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"

    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_load_split_finds_files_by_argument_environment_and_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arg = _write_mnist_files(tmp_path / "arg", compress=False, n_test=11)
    env = _write_mnist_files(tmp_path / "env", compress=False, n_test=12)
    default = _write_mnist_files(tmp_path / "cwd" / "data", compress=False, n_test=13)
    monkeypatch.chdir(tmp_path / "cwd")

    def test_labels(data_dir: Path | None = None) -> torch.Tensor:
        return load_split("mnist", False, data_dir, download_missing=False).labels

    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert torch.equal(test_labels(), default[False][1])
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert torch.equal(test_labels(), env[False][1])
    assert torch.equal(test_labels(tmp_path / "arg"), arg[False][1])


def test_limit_takes_the_first_n_images(tmp_path: Path) -> None:
    written = _write_mnist_files(tmp_path, compress=False, n_train=30)
    images, labels = written[True]
    for limit in (1, 7, 30):
        split = load_split("mnist", True, tmp_path, limit=limit, download_missing=False)
        assert len(split) == limit
        assert torch.equal(split.images[:, 0], images[:limit])
        assert torch.equal(split.labels, labels[:limit])
    everything = load_split("mnist", True, tmp_path, limit=1000, download_missing=False)
    assert torch.equal(everything.labels, labels)


@pytest.mark.parametrize("limit", [0, -5])
def test_limit_must_be_positive(tmp_path: Path, limit: int) -> None:
    _write_mnist_files(tmp_path, compress=False)
    with pytest.raises(NormcliError, match="limit"):
        load_split("mnist", True, tmp_path, limit=limit, download_missing=False)


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(NormcliError, match="mnist.*cifar10"):
        get_dataset("imagenet")


# ---------------------------------------------------------------------------
# Normalization and batches
# ---------------------------------------------------------------------------


def test_normalize_uses_the_dataset_constants() -> None:
    spec = get_dataset("cifar10")
    images = _random_uint8((2, 3, 4, 4), seed=3)
    x = normalize(images, spec)
    for c in range(3):
        expected = (images[:, c].double() / 255 - spec.mean[c]) / spec.std[c]
        torch.testing.assert_close(x[:, c].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(denormalize(x, spec), images.float() / 255, rtol=0, atol=1e-6)
    assert torch.equal(normalize(images.float() / 255, spec), x)


def test_batches_cover_the_split_in_order_or_shuffled() -> None:
    spec = get_dataset("mnist")
    split = data.Split(_random_uint8((25, 1, 28, 28), seed=4), _random_labels(25, seed=4))

    plain = list(batches(split, spec, 10))
    assert [len(y) for _, y in plain] == [10, 10, 5]
    assert torch.equal(torch.cat([y for _, y in plain]), split.labels)
    assert torch.equal(torch.cat([x for x, _ in plain]), normalize(split.images, spec))

    g = torch.Generator().manual_seed(0)
    shuffled = list(batches(split, spec, 10, shuffle=True, generator=g))
    xs, ys = torch.cat([x for x, _ in shuffled]), torch.cat([y for _, y in shuffled])
    assert not torch.equal(ys, split.labels)
    # Every image keeps its own label: match each shuffled image back to its source.
    source = normalize(split.images, spec).flatten(1)
    index = torch.cdist(xs.flatten(1), source).argmin(1)
    assert sorted(index.tolist()) == list(range(25))
    assert torch.equal(ys, split.labels[index])


# ---------------------------------------------------------------------------
# Batched augmentation
# ---------------------------------------------------------------------------


def _float_batch(n: int, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_default_augmentation_keeps_shape_and_dtype(dataset: str) -> None:
    spec = get_dataset(dataset)
    x = _float_batch(6, *spec.input_shape[:2])
    y = get_dataset(dataset).augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.equal(y, x)


def test_crop_without_padding_and_without_flip_is_identity() -> None:
    x = _float_batch(5)
    y = random_crop_flip(x, 0, torch.Generator().manual_seed(0), flip=False)
    assert torch.equal(y, x)
    assert torch.equal(Augment()(x, torch.Generator()), x)


def test_crop_takes_a_window_of_the_zero_padded_image() -> None:
    pad, x = 2, _float_batch(16, c=2, size=6, seed=1)
    y = random_crop_flip(x, pad, torch.Generator().manual_seed(3), flip=False)
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(y[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert found, f"image {i} is not a window of its padded copy"
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # offsets are drawn per image


def test_flip_flips_each_image_or_leaves_it() -> None:
    x = _float_batch(200, c=1, size=5, seed=2)
    y = random_crop_flip(x, 0, torch.Generator().manual_seed(0), flip=True)
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(len(x))])
    assert (flipped | kept).all()
    assert 60 < int(flipped.sum()) < 140  # p = 0.5


def test_flip_when_every_coin_says_flip_equals_torch_flip(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _float_batch(7, seed=3)
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros_like(real_rand(*a, **k)))
    y = random_crop_flip(x, 0, torch.Generator().manual_seed(0), flip=True)
    assert torch.equal(y, torch.flip(x, dims=[3]))


def test_affine_with_zero_rotation_and_shift_is_identity() -> None:
    x = _float_batch(4, c=1, size=28, seed=4)
    y = random_affine(x, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


def test_affine_equals_affine_grid_with_the_same_draws() -> None:
    """The separable grid is F.affine_grid's: rotation about the centre, then the shift."""
    x = _float_batch(16, c=1, size=28, seed=6)
    y = random_affine(x, 7.0, 2.0, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # the same draws, in the same order
    angle = (torch.rand(16, generator=g) * 2 - 1) * math.radians(7.0)
    shift = (torch.rand(16, 2, generator=g) * 2 - 1) * 2.0
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0] * 2 / 28], 1),
                         torch.stack([sin, cos, shift[:, 1] * 2 / 28], 1)], 1)  # fmt: skip
    grid = F.affine_grid(theta, [16, 1, 28, 28], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_affine_moves_pixels_within_the_bounds() -> None:
    # A single bright pixel moves at most `shift` pixels (plus bilinear spread) per axis.
    x = torch.zeros(32, 1, 15, 15)
    x[:, :, 7, 7] = 1.0
    y = random_affine(x, 0.0, 2.0, torch.Generator().manual_seed(0))
    assert not torch.equal(y, x)
    rows = y.sum(3).squeeze(1)
    cols = y.sum(2).squeeze(1)
    centre = torch.arange(15.0)
    for profile in (rows, cols):
        mean = (profile * centre).sum(1) / profile.sum(1)
        assert ((mean - 7).abs() <= 2.0 + 1e-4).all()


@pytest.mark.parametrize(
    "augment",
    [Augment(degrees=7, shift=2), Augment(crop_padding=4, flip=True), Augment(7, 2, 4, True)],
    ids=["affine", "crop_flip", "all"],
)
def test_same_generator_seed_gives_the_same_augmentation(augment: Augment) -> None:
    x = _float_batch(8, size=16, seed=5)
    a = augment(x, torch.Generator().manual_seed(42))
    b = augment(x, torch.Generator().manual_seed(42))
    c = augment(x, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
