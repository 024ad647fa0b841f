"""Checkpoints: safetensors files whose metadata alone rebuilds the model.

Tensors: the model's state dict under `model.`, and, for resuming, optimizer
buffers under `optim.` and RNG states under `rng.`. Metadata (all strings,
JSON where structured) is checked against `CheckpointMeta`'s type hints before
anything is built.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import struct
import tempfile
import typing
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from normcli import __version__
from normcli.config import ADDED_TRAIN_FIELDS, ModelArgs, RunSpec, TrainArgs, check_type, from_json
from normcli.data import DATASETS
from normcli.errors import NormcliError
from normcli.models import check_model_fits

FORMAT_VERSION = 2  # 2: the run described by model_args + train_args; 1: spread over keys
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a normcli header is a few hundred kB at most
MAX_FILE_BYTES = 2 * 1024**3


class _EpochRequired(TypedDict):
    epoch: int
    train_loss: float
    train_accuracy: float  # percent
    test_loss: float
    test_accuracy: float  # percent
    lr: float  # learning rate at the end of the epoch
    seconds: float  # training time of the epoch, evaluation excluded
    images_per_second: float


class EpochRecord(_EpochRequired, total=False):
    """One history row: what an epoch measured. The one declaration of the history's keys."""

    val_loss: float  # with a validation split (--val)
    val_accuracy: float


HISTORY_KEYS: tuple[str, ...] = tuple(typing.get_type_hints(EpochRecord))


class RunMetrics(TypedDict, total=False):
    """A finished run's final metrics, from its history (study.final_metrics): the last row's,
    where an error is 100 - that accuracy (the GN paper's axis), and totals over all rows.
    The one declaration of the metrics studies aggregate and plot."""

    test_accuracy: float
    test_loss: float
    train_loss: float
    test_error: float
    val_accuracy: float  # val_*: with a validation split
    val_loss: float
    val_error: float
    seconds: float  # training time of all epochs
    epochs: int


FINAL_METRICS: tuple[str, ...] = tuple(typing.get_type_hints(RunMetrics))


class ResumeState(TypedDict):
    """What resuming needs besides tensors: how far the run got and the size of an epoch."""

    epoch: int
    steps_per_epoch: int


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild, describe and resume a run; each key is stored once, as
    JSON text, under the field's name."""

    model_args: ModelArgs  # resolved: rebuilds the network
    train_args: TrainArgs  # resolved: how it was trained
    class_names: list[str]  # the dataset's facts, so a file describes itself
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    history: list[EpochRecord] = field(default_factory=list)
    resume: ResumeState | None = None
    format_version: int = FORMAT_VERSION
    normcli_version: str = __version__
    torch_version: str = torch.__version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def dataset(self) -> str:
        return self.model_args.dataset

    @property
    def run(self) -> RunSpec:
        return RunSpec(self.model_args, self.train_args)

    @property
    def label(self) -> str:
        """Short run label, e.g. 'BN + L1 (1e-4)', 'GN (G=4) + WS'."""
        return self.run.label

    def to_strings(self) -> dict[str, str]:
        return {k: json.dumps(v, allow_nan=False) for k, v in asdict(self).items()}

    @classmethod
    def from_strings(cls, raw: dict[str, str] | None, where: str) -> CheckpointMeta:
        """Parse and validate safetensors metadata; NormcliError names the first problem."""
        if not raw or "format_version" not in raw:
            raise NormcliError(f"{where}: not a normcli checkpoint (no normcli metadata)")
        values = _decode(raw, where)
        hints = typing.get_type_hints(cls)
        known = {k: v for k, v in values.items() if k in hints}
        for key in _REQUIRED:
            if key not in known:
                raise NormcliError(f"{where}: incomplete normcli metadata, {key!r} missing")
        for key, value in known.items():
            if problem := check_type(value, hints[key]):
                raise NormcliError(f"{where}: metadata {key!r} has the wrong type ({problem})")
            if key in ("model_args", "train_args"):
                known[key] = from_json(hints[key], value, f"{where}: metadata {key!r}")
        meta = cls(**known)
        _check_consistent(meta, where)
        return meta


def _decode(raw: dict[str, str], where: str) -> dict[str, Any]:
    """Every metadata value parsed as JSON, in the current format (older ones upgraded)."""
    values: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            values[key] = json.loads(text)
        except (ValueError, RecursionError):  # malformed, too deeply nested, huge integers
            raise NormcliError(f"{where}: metadata {key!r} is not valid JSON") from None
    version = values["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise NormcliError(f"{where}: unknown checkpoint format {version!r}")
    if version > FORMAT_VERSION:
        raise NormcliError(
            f"{where}: checkpoint format {version} is newer than this "
            f"normcli understands ({FORMAT_VERSION}); upgrade normcli"
        )
    values = _upgrade_v1(values) if version == 1 else values
    train_args = values.get("train_args")
    if isinstance(train_args, dict):  # written before some options existed: their defaults
        values["train_args"] = {**ADDED_TRAIN_FIELDS, **train_args}
    return values


_REQUIRED = tuple(
    f.name for f in fields(CheckpointMeta)
    if f.default is MISSING and f.default_factory is MISSING
) + ("history", "format_version")  # fmt: skip
METADATA_KEYS: tuple[str, ...] = tuple(f.name for f in fields(CheckpointMeta))


def _upgrade_v1(values: dict[str, Any]) -> dict[str, Any]:
    """Format-1 metadata in format 2. Format 1 spread the model description over top-level
    keys (ws as `weight_standardization`, absent before it existed: plain convolutions),
    repeated it in `config` with the training options, and kept the scheduler's own state
    for resuming; the epoch size is what remains of that."""
    config = values.get("config")
    config = config if isinstance(config, dict) else {}
    model_keys = ("dataset", "model", "norm", "groups", "dropout")
    model_args = {k: values[k] for k in model_keys if k in values}
    model_args["ws"] = values.get("weight_standardization", False)
    if isinstance(values.get("class_names"), list):
        model_args["num_classes"] = len(values["class_names"])
    train_args = {k: v for k, v in config.items() if k not in (*model_keys, "ws")}
    train_args = {"val": 0, "threads": None, **train_args}  # options added in format 2
    # (ADDED_TRAIN_FIELDS, added later, are filled in for every format by _decode)
    resume = values.get("resume")
    if isinstance(resume, dict):
        scheduler = resume.get("scheduler")
        total = scheduler.get("total_steps") if isinstance(scheduler, dict) else None
        epochs = train_args.get("epochs")
        fits = isinstance(total, int) and isinstance(epochs, int) and epochs > 0
        steps = total // epochs if fits and total % epochs == 0 else None
        resume = {"epoch": resume.get("epoch"), "steps_per_epoch": steps}
    kept = ("class_names", "input_shape", "mean", "std", "history",
            "normcli_version", "torch_version", "created")  # fmt: skip
    upgraded = {k: values[k] for k in kept if k in values}
    return {**upgraded, "model_args": model_args, "train_args": train_args,
            "resume": resume, "format_version": FORMAT_VERSION}  # fmt: skip


def _check_consistent(meta: CheckpointMeta, where: str) -> None:
    """The dataset facts must be the ones normcli knows (they shape inputs and outputs), the
    run description must be resolved, and the history must count epochs 1, 2, ..."""
    if meta.dataset not in DATASETS:
        raise NormcliError(
            f"{where}: unknown dataset {meta.dataset!r}; available: {', '.join(DATASETS)}"
        )
    dataset = DATASETS[meta.dataset]
    m = meta.model_args
    checks = {
        "class_names": len(meta.class_names) == dataset.num_classes == m.num_classes,
        "input_shape": tuple(meta.input_shape) == dataset.input_shape,
        "mean": len(meta.mean) == dataset.input_shape[0],
        "std": len(meta.std) == dataset.input_shape[0] and all(s > 0 for s in meta.std),
    }
    for key, good in checks.items():
        if not good:
            raise NormcliError(f"{where}: metadata {key!r} does not fit dataset {dataset.name}")
    unresolved = [k for k, v in asdict(m).items() if v is None and k != "groups"]
    unresolved += [
        k for k, v in asdict(meta.train_args).items() if v is None and k not in ("limit", "threads")
    ]  # threads: unknown in old files
    if unresolved:
        raise NormcliError(f"{where}: metadata leaves {unresolved[0]!r} unset")
    _check_model_fits(meta, where)
    epochs = [row["epoch"] for row in meta.history]
    if epochs != list(range(1, len(epochs) + 1)):
        raise NormcliError(f"{where}: metadata 'history' epochs are not 1, 2, ...")


def _check_model_fits(meta: CheckpointMeta, where: str) -> None:
    """The model must take the dataset's images, or the first batch fails inside a conv."""
    try:
        check_model_fits(meta.model_args.model, meta.dataset)
    except NormcliError as e:
        raise NormcliError(f"{where}: metadata {e}") from None


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode), its metadata and extra tensors."""

    path: Path
    model: nn.Module
    meta: CheckpointMeta
    extra: dict[str, torch.Tensor]


def _check_header(path: Path) -> int:
    """Refuse files that cannot be safetensors before handing them to the parser; returns
    the length of the JSON header."""
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
    return header_len


def read_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    """Raw metadata and tensors of a safetensors file, with clean errors."""
    path = Path(path)
    try:
        header_len = _check_header(path)
        # Read here, parsed from memory: safetensors opens only paths that are valid UTF-8,
        # and a file name may be any bytes.
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # unreadable, or a name the OS refuses
        raise NormcliError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        tensors = load_safetensors(data)  # checks the header and every tensor's extent
        raw = json.loads(data[8 : 8 + header_len]).get("__metadata__")
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
    path = Path(path)
    raw, tensors = read_file(path)
    meta = CheckpointMeta.from_strings(raw, str(path))
    try:
        model = meta.model_args.build()
    except NormcliError as e:  # say which file holds the bad model description
        raise NormcliError(f"{path}: {e}") from None
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    name = meta.model_args.model
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise NormcliError(f"{path}: tensors do not match model {name} ({what})")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise NormcliError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"model {name} needs {tuple(expected[key].shape)}"
            )
        if value.dtype != expected[key].dtype:
            raise NormcliError(
                f"{path}: tensor {key!r} has dtype {value.dtype}, "
                f"model {name} needs {expected[key].dtype}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NormcliError(f"{path}: tensor {key!r} holds NaN or infinite values")
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


def find_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The checkpoints named: files as given, folders (a sweep, a study) as the *.safetensors
    files directly inside them, sorted by name. Hidden files are skipped, as `ls` does: macOS
    leaves `._NAME` files of resource forks beside copied files, and normcli its temporary
    `.NAME.*.tmp` files."""
    found: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            inside = sorted(
                p for p in given.glob("*.safetensors") if p.is_file() and p.name[0] != "."
            )
            if not inside:
                raise NormcliError(f"{given}: no .safetensors checkpoints in this folder")
            found += inside
        else:
            found.append(given)
    return found


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


def history_records(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One record per run and epoch (like timm's summary.csv, for pandas or a spreadsheet):
    the run's name, path and label, every run option, then the epoch's history row. The
    option `lr` (the schedule's peak) is `peak_lr` here: `lr` is the epoch's rate."""
    rows = []
    for path in paths:
        meta = read_metadata(path)
        options = _peak_lr(meta.run.options())
        run = {"run": Path(path).stem, "path": str(path), "label": meta.label, **options}
        rows += [{**run, **{k: row.get(k) for k in HISTORY_KEYS}} for row in meta.history]
    return rows


def history_columns() -> list[str]:
    """The keys of every `history_records` row, in order (the CSV header, rows or none)."""
    return ["run", "path", "label", *_peak_lr(RunSpec().options()), *HISTORY_KEYS]


def _peak_lr(options: dict[str, Any]) -> dict[str, Any]:
    """Run options with `lr` renamed `peak_lr` (moved last): in a history row, lr is the
    epoch's rate."""
    options = dict(options)
    options["peak_lr"] = options.pop("lr")
    return options
