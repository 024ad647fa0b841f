"""Checkpoints: safetensors files whose metadata alone rebuilds the model.

Tensors: the model's state dict under `model.`, and, for resuming, optimizer
buffers under `optim.` and RNG states under `rng.`. Metadata (all strings,
JSON where structured) is validated against `SCHEMA` before anything is built.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from normcli import __version__
from normcli.data import DATASETS
from normcli.errors import NormcliError
from normcli.norms import norm_label

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a normcli header is a few hundred kB at most
MAX_FILE_BYTES = 2 * 1024**3

# key -> (JSON-decoded python type(s), required). Values are JSON text in the file.
SCHEMA: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "format_version": (int, True),
    "model": (str, True),
    "norm": (str, True),
    "groups": ((int, type(None)), True),
    "weight_standardization": (bool, False),  # absent in files from before it existed
    "dropout": (float, True),
    "dataset": (str, True),
    "class_names": (list, True),
    "input_shape": (list, True),
    "mean": (list, True),
    "std": (list, True),
    "config": (dict, True),
    "history": (list, True),
    "normcli_version": (str, True),
    "torch_version": (str, True),
    "created": (str, True),
    "resume": ((dict, type(None)), False),
}
# Every history row (one per epoch) holds at least these numbers.
HISTORY_KEYS = (
    "epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
    "lr", "seconds", "images_per_second",
)  # fmt: skip


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild, describe and resume a run."""

    model: str
    norm: str
    groups: int | None
    dropout: float
    dataset: str
    class_names: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    resume: dict[str, Any] | None = None
    weight_standardization: bool = False
    format_version: int = FORMAT_VERSION
    normcli_version: str = __version__
    torch_version: str = torch.__version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def l1(self) -> float:
        return float(self.config.get("l1", 0.0))

    @property
    def label(self) -> str:
        """Short run label, e.g. 'BN + L1 (1e-4)', 'GN (G=4) + WS'."""
        return norm_label(self.norm, self.groups, self.l1, self.weight_standardization)

    def to_strings(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_strings(cls, raw: dict[str, str] | None, where: str) -> CheckpointMeta:
        """Parse and validate safetensors metadata; NormcliError names the first problem."""
        if not raw or "format_version" not in raw:
            raise NormcliError(f"{where}: not a normcli checkpoint (no normcli metadata)")
        values: dict[str, Any] = {}
        for key, (types, required) in SCHEMA.items():
            if key not in raw:
                if required:
                    raise NormcliError(f"{where}: incomplete normcli metadata, {key!r} missing")
                continue
            try:
                value = json.loads(raw[key])
            except (ValueError, RecursionError):  # malformed, too deeply nested, huge integers
                raise NormcliError(f"{where}: metadata {key!r} is not valid JSON") from None
            if types is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) is not (types is bool) or not isinstance(value, types):
                raise NormcliError(f"{where}: metadata {key!r} has the wrong type")
            values[key] = value
        if values["format_version"] > FORMAT_VERSION:
            raise NormcliError(
                f"{where}: checkpoint format {values['format_version']} is newer than this "
                f"normcli understands ({FORMAT_VERSION}); upgrade normcli"
            )
        if values["format_version"] < 1:
            raise NormcliError(f"{where}: unknown checkpoint format {values['format_version']}")
        _check_lists(values, where)
        _check_dataset(values, where)
        return cls(**values)


def _check_lists(values: dict[str, Any], where: str) -> None:
    def ok(seq: list, kind: type | tuple[type, ...]) -> bool:
        return all(isinstance(v, kind) and not isinstance(v, bool) for v in seq)

    checks = {
        "class_names": ok(values["class_names"], str),
        "input_shape": len(values["input_shape"]) == 3 and ok(values["input_shape"], int),
        "mean": ok(values["mean"], (int, float)),
        "std": ok(values["std"], (int, float)) and all(s > 0 for s in values["std"]),
        "history": ok(values["history"], dict),
    }
    for key, good in checks.items():
        if not good:
            raise NormcliError(f"{where}: metadata {key!r} has the wrong type")
    for row in values["history"]:
        numbers = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in row.values()
        )
        if not numbers or not all(k in row for k in HISTORY_KEYS):
            raise NormcliError(f"{where}: metadata 'history' has the wrong type")


def _check_dataset(values: dict[str, Any], where: str) -> None:
    """The dataset facts must be the ones normcli knows: they shape inputs and outputs."""
    spec = DATASETS.get(values["dataset"])
    if spec is None:
        raise NormcliError(
            f"{where}: unknown dataset {values['dataset']!r}; available: {', '.join(DATASETS)}"
        )
    checks = {
        "class_names": len(values["class_names"]) == spec.num_classes,
        "input_shape": tuple(values["input_shape"]) == spec.input_shape,
        "mean": len(values["mean"]) == spec.input_shape[0],
        "std": len(values["std"]) == spec.input_shape[0],
    }
    for key, good in checks.items():
        if not good:
            raise NormcliError(f"{where}: metadata {key!r} does not fit dataset {spec.name}")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode), its metadata and extra tensors."""

    path: Path
    model: nn.Module
    meta: CheckpointMeta
    extra: dict[str, torch.Tensor]


def _check_header(path: Path) -> None:
    """Refuse files that cannot be safetensors before handing them to the parser."""
    if not path.exists():
        raise NormcliError(f"{path}: no such file")
    if not path.is_file():
        raise NormcliError(f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise NormcliError(f"{path}: empty file, not a checkpoint")
    if size > MAX_FILE_BYTES:
        raise NormcliError(f"{path}: {size} bytes, too large for a normcli checkpoint")
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise NormcliError(f"{path}: not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER_BYTES or header_len > size - 8 or head[8:9] != b"{":
        raise NormcliError(f"{path}: not a safetensors file (bad header)")


def read_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    """Raw metadata and tensors of a safetensors file, with clean errors."""
    path = Path(path)
    try:
        _check_header(path)
    except (OSError, ValueError) as e:  # unreadable, or a name the OS refuses
        raise NormcliError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NormcliError(f"{path}: not a valid safetensors file ({reason})") from None
    return raw, tensors


def read_metadata(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Validated normcli metadata of a checkpoint, without building the model."""
    raw, _ = read_file(path)
    return CheckpointMeta.from_strings(raw, str(path))


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Checkpoint:
    """Load a checkpoint and rebuild the exact model from its metadata alone."""
    from normcli.models import build_model  # models import nothing from here; keep it one-way

    path = Path(path)
    raw, tensors = read_file(path)
    meta = CheckpointMeta.from_strings(raw, str(path))
    try:
        model = build_model(
            meta.model,
            norm=meta.norm,
            groups=meta.groups,
            dropout=meta.dropout,
            num_classes=len(meta.class_names),
            ws=meta.weight_standardization,
        )
    except NormcliError as e:  # say which file holds the bad model description
        raise NormcliError(f"{path}: {e}") from None
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise NormcliError(f"{path}: tensors do not match model {meta.model} ({what})")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise NormcliError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"model {meta.model} needs {tuple(expected[key].shape)}"
            )
        if value.dtype != expected[key].dtype:
            raise NormcliError(
                f"{path}: tensor {key!r} has dtype {value.dtype}, "
                f"model {meta.model} needs {expected[key].dtype}"
            )
    model.load_state_dict(state)
    model.to(device).eval()
    extra = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return Checkpoint(path, model, meta, extra)


def check_writable(path: Path) -> None:
    """Fail early, before any work, if `path` cannot be written or is not a regular file."""
    check_replaceable(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise NormcliError(f"{path}: folder {parent} does not exist")
    check_folder_writable(parent, path)


def check_replaceable(path: Path) -> None:
    """Refuse an existing `path` (or a symlink's target) that is not a regular file.

    A rename over a device, a FIFO or a socket would replace it (as root, /dev/null itself),
    whatever --overwrite says: normcli writes regular files only.
    """
    try:
        mode = path.stat().st_mode  # follows symlinks: a link is judged by what it points to
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a dangling symlink,
        return  # which the rename replaces); a missing folder is reported by the caller
    except OSError as e:  # a name the OS refuses, a loop of symlinks, no permission
        raise NormcliError(f"{path}: cannot check ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise NormcliError(f"{path}: is a directory, expected a file path")
    if not stat.S_ISREG(mode):
        link = "a symbolic link to " if path.is_symlink() else ""
        raise NormcliError(
            f"{path}: is {link}{_KINDS.get(stat.S_IFMT(mode), 'a special file')}, "
            "not a regular file; normcli writes regular files only"
        )


_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def check_folder_writable(folder: Path, path: Path) -> None:
    """Refuse, naming `path`, an existing `folder` that this process cannot create files in."""
    if not os.access(folder, os.W_OK):
        raise NormcliError(f"{path}: folder {folder} is not writable")
    try:  # os.access says yes to root even on read-only file systems: ask the folder itself
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise NormcliError(f"{path}: folder {folder} is not writable ({e.strerror or e})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(path: Path, e: OSError) -> NormcliError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NormcliError(f"no space left on {path} ({e.strerror or e}); nothing was written")
    return NormcliError(f"{path}: cannot write ({e.strerror or e})")


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename over `path`: readers never see a partial file.

    The temporary file sits beside `path` and is removed whatever stops the write (an
    error, a full disk, Ctrl-C, SIGTERM); an existing `path` stays as it was until the rename.
    """
    check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        check_replaceable(path)  # something may have appeared there while we wrote
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, read-only file system, ...
            raise _write_error(path, e) from None
        raise


@contextlib.contextmanager
def exclusive_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Claim `path` for this process while the block runs; yields it as a Path.

    A second normcli process claiming the same path meanwhile fails at once with a
    NormcliError naming the holder's pid, instead of both writing and one silently losing.
    The claim is an flock on `.<name>.lock` beside `path` (released by the kernel if the
    holder dies); the lock file is removed when the block ends.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise NormcliError(
                f"{path}: cannot create lock file {lock} ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise NormcliError(
                    f"{path} is being written by another normcli process (pid {holder})"
                ) from None
            raise NormcliError(f"{path}: cannot lock {lock} ({e.strerror or e})") from None
        # The previous holder removes the file when it is done; if it did so between our open
        # and our flock, we hold a lock on a file no one else can see: open it again.
        try:
            ours, current = os.fstat(fd), os.stat(lock)
            if (ours.st_dev, ours.st_ino) == (current.st_dev, current.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        lock.unlink(missing_ok=True)  # still locked: a waiting process re-opens, see above
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    meta: CheckpointMeta,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model weights (+ extra tensors) and metadata atomically; returns the path."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for key, value in (extra or {}).items():
        tensors[key] = value.detach().cpu().contiguous()
    atomic_write(path, lambda tmp: _save_file(tensors, tmp, meta.to_strings()))
    return path


def _save_file(tensors: dict[str, torch.Tensor], tmp: str, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as OSError."""
    try:
        save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as e:  # "Error while serializing: I/O error: ... (os error 28)"
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from None
