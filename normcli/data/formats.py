"""The official file formats, read and written: IDX (the MNIST family) and the CIFAR binary and
python batches. Every reader refuses malformed content in one line (a NormcliError naming the
file); the python batches go through the one restricted unpickler in normcli. The writers are
the readers' inverses, for the tiny official-format files tests and benches write.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from pathlib import Path

import torch

from normcli.data.batching import Split
from normcli.errors import NormcliError

_IDX_MAGIC_UBYTE = 0x08
# The largest official file is 47 MB (MNIST training images, unpacked): refuse far bigger
# ones (or gzip bombs) before reading them into memory.
MAX_DATA_FILE_BYTES = 256 * 1024**2
_CIFAR_PIXELS = 3 * 32 * 32  # bytes per image: 1024 R, 1024 G, 1024 B


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


def read_idx_split(image_path: Path, label_path: Path, num_classes: int) -> Split:
    """A split from an IDX file of (N, H, W) images and one of N labels 0..num_classes-1."""
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise NormcliError(
            f"{image_path}: {tuple(images.shape)} images do not match "
            f"{tuple(labels.shape)} labels in {label_path}"
        )
    _check_labels(labels, label_path, num_classes)
    return Split(images.unsqueeze(1).contiguous(), labels.long())


def idx_bytes(data: torch.Tensor) -> bytes:
    """A uint8 tensor as an IDX file: bytes 0, 0, 0x08, ndim; big-endian sizes; the data."""
    if data.dtype != torch.uint8:  # 0x08 promises unsigned bytes: anything else is a bad file
        raise ValueError(f"IDX files of unsigned bytes hold uint8 tensors, not {data.dtype}")
    header = bytes([0, 0, _IDX_MAGIC_UBYTE, data.ndim])
    header += b"".join(d.to_bytes(4, "big") for d in data.shape)
    return header + data.contiguous().numpy().tobytes()


def write_idx(path: Path, data: torch.Tensor, *, compress: bool = False) -> Path:
    """Write a uint8 tensor as an IDX file, gzipped to PATH.gz with `compress`; returns its path."""
    raw = idx_bytes(data)
    if compress:
        path = path.with_name(f"{path.name}.gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


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


def cifar_records(images: torch.Tensor, labels: torch.Tensor, *, label_bytes: int = 1) -> bytes:
    """A CIFAR binary batch: per image `label_bytes` label bytes (the last one the label, any
    before it 0: CIFAR-100's coarse label), then 1024 R, 1024 G, 1024 B bytes."""
    label_column = labels.to(torch.uint8)[:, None]
    columns = [torch.zeros_like(label_column)] * (label_bytes - 1) + [label_column]
    return torch.cat([*columns, images.reshape(len(labels), -1)], 1).numpy().tobytes()


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
