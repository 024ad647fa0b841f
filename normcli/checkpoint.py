"""Checkpoints: safetensors files whose metadata alone rebuilds the model.

Tensors: the model's state dict under `model.`, and, for resuming, optimizer
buffers under `optim.` and RNG states under `rng.`. Metadata (all strings,
JSON where structured) is checked against `CheckpointMeta`'s type hints before
anything is built.
"""

from __future__ import annotations

import json
import os
import re
import struct
import typing
from collections.abc import Sequence
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
from normcli.config import ModelArgs, RunSpec, TrainArgs, with_added_fields
from normcli.data import DATASETS
from normcli.errors import NormcliError
from normcli.files import atomic_write
from normcli.machine import MachineRecord
from normcli.models import check_model_fits
from normcli.schema import check_type, from_json

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
    train_accuracy: float  # percent, measured while the last epoch trained
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


def utc_now() -> str:
    """The time now, UTC, ISO 8601: how checkpoints write their times."""
    return datetime.now(timezone.utc).isoformat()


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
    created: str = field(default_factory=utc_now)  # when this file was written
    machine: MachineRecord | None = None  # where it trained; None in files from before
    started: str | None = None  # when the run first started (UTC); None in files from before

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
    for key, record in (("model_args", ModelArgs), ("train_args", TrainArgs)):
        if isinstance(values.get(key), dict):  # written before some fields existed
            values[key] = with_added_fields(record, values[key])
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
    # (fields added later, with a `before` value, are filled in for every format by _decode)
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
        k
        for k, v in asdict(meta.train_args).items()
        if v in (None, "auto") and k not in ("limit", "threads")
    ]  # threads: unknown in old files; "auto" (precision): a file records what it trained in
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

