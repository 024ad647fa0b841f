"""The run description: what rebuilds a model (`ModelArgs`), how it was trained (`TrainArgs`),
the two together (`RunSpec`), and the one validator that reads them back from JSON.

Both records are stored once in every checkpoint, under their own metadata keys, with the
same field names users type as options (`--batch-size` is `batch_size`). A field left None
means "the default": `resolve()` fills it from the dataset, model and norm records, and the
resolved record is what a checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normcli.data import get_dataset
from normcli.errors import NormcliError
from normcli.models import build_model, check_model_fits, default_model, resolve_groups
from normcli.norms import NORMS, format_lambda, get_norm, norm_label, resolve_ws

CHECKPOINT_DIR = Path("checkpoints")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; stay within a signed int64


@dataclass(frozen=True)
class ModelArgs:
    """What rebuilds the model: the network, its norm, and the dataset it classifies."""

    dataset: str = "mnist"
    model: str | None = None  # registry name; None: the default model for the dataset
    norm: str = "bn"
    groups: int | None = None  # GroupNorm groups; None: the model's default (gn only)
    ws: bool | None = None  # weight-standardized convolutions; None: the norm's default
    dropout: float | None = None  # None: the dataset's default
    num_classes: int | None = None  # size of the head; None: the dataset's class count

    def resolve(self) -> ModelArgs:
        """Every default filled in and checked against the dataset, model and norm records."""
        dataset = get_dataset(self.dataset)
        model = self.model or default_model(self.dataset)
        check_model_fits(model, self.dataset)
        if self.num_classes is not None and self.num_classes != dataset.num_classes:
            raise NormcliError(
                f"num_classes {self.num_classes} does not match {self.dataset}'s "
                f"{dataset.num_classes} classes"
            )
        dropout = self.dropout
        if dropout is None:
            dropout = float(dataset.training_defaults(self.norm).get("dropout", 0.0))
        resolved = ModelArgs(
            dataset=self.dataset,
            model=model,
            norm=self.norm,
            groups=resolve_groups(model, self.norm, self.groups),
            ws=resolve_ws(self.norm, self.ws),
            dropout=float(dropout),
            num_classes=dataset.num_classes,
        )
        with torch.device("meta"):  # refuses bad groups/dropout before any data is read
            resolved.build()
        return resolved

    def build(self) -> nn.Module:
        """The network these arguments describe (freshly initialized)."""
        return build_model(
            self.model or default_model(self.dataset),
            norm=self.norm,
            groups=self.groups,
            dropout=self.dropout,
            num_classes=self.num_classes,
            ws=self.ws,
        )


@dataclass(frozen=True)
class TrainArgs:
    """How a model was trained; None means the dataset's default for the norm."""

    epochs: int | None = None
    batch_size: int | None = None  # images per optimizer step
    lr: float | None = None  # peak learning rate of the one-cycle schedule
    momentum: float = 0.9  # SGD (Nesterov) momentum
    weight_decay: float | None = None
    l1: float = 0.0  # lambda of the L1 term: lambda * sum |w| over trainable parameters
    seed: int = 1
    augment: bool = True  # the dataset's batch augmentation
    limit: int | None = None  # train and test on the first N images only
    val: int = 0  # hold out N training images (chosen by the seed) as a validation split
    channels_last: bool | None = None  # None: the norm's layout (contiguous for gn)
    threads: int | None = None  # CPU threads per process; None: see resolve()
    # Data parallelism: batch_size is the global batch, split evenly over world_size
    # processes (set by the launcher, not by the user); sync_bn normalizes BatchNorm over
    # the global batch instead of each process's share.
    world_size: int = 1
    sync_bn: bool = False

    @property
    def per_process_batch(self) -> int | None:
        """Images each process takes of a batch (the whole batch with one process)."""
        return None if self.batch_size is None else self.batch_size // self.world_size

    def resolve(self, model: ModelArgs) -> TrainArgs:
        """Defaults filled in from the dataset's record for `model`'s norm (threads: see
        `default_threads`), then validated."""
        defaults = get_dataset(model.dataset).training_defaults(model.norm)
        missing = {k: defaults[k] for k in ("epochs", "batch_size", "lr", "weight_decay")}
        missing["threads"] = default_threads(self.world_size)
        missing["channels_last"] = get_norm(model.norm).channels_last
        filled = dataclasses.replace(
            self, **{k: v for k, v in missing.items() if getattr(self, k) is None}
        )
        filled.validate(model)
        return filled

    def validate(self, model: ModelArgs | None = None) -> None:
        """Refuse values outside their ranges, naming the parameter; with `model`, also the
        options that depend on it."""
        for name, (fits, wanted) in _TRAIN_RANGES.items():
            value = getattr(self, name)
            if not fits(value):
                raise NormcliError(f"{name} must be {wanted}, got {value}")
        if self.batch_size % self.world_size:
            raise NormcliError(
                f"batch_size {self.batch_size} is the global batch and must divide by the "
                f"{self.world_size} processes; try {_multiple(self.batch_size, self.world_size)}"
            )
        if model is not None and self.sync_bn and not get_norm(model.norm).uses_batch_statistics:
            takers = ", ".join(n.name for n in NORMS.values() if n.uses_batch_statistics)
            raise NormcliError(
                f"sync_bn applies to norms with batch statistics ({takers}), not to {model.norm}"
            )


def _multiple(n: int, k: int) -> int:
    """The multiple of k nearest to n (rounding up on a tie), at least k."""
    return max(k, (n + k // 2) // k * k)


def default_threads(world_size: int) -> int:
    """CPU threads per process when not given: torch's count (which honours OMP_NUM_THREADS)
    for one process; for several, this machine's cores shared out among its processes of the
    run (the launcher's LOCAL_WORLD_SIZE when set, as torchrun sets it, else `world_size`),
    not torchrun's default OMP_NUM_THREADS=1."""
    if world_size == 1:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(local, 1))


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


# Training option -> (does the value fit, what it must be). None passes where it means "off".
_TRAIN_RANGES: dict[str, tuple[Any, str]] = {
    "epochs": (lambda v: _finite(v) and v > 0, "positive"),
    "batch_size": (lambda v: _finite(v) and v > 0, "positive"),
    "lr": (lambda v: _finite(v) and v > 0, "positive"),
    "l1": (lambda v: _finite(v) and v >= 0, "a non-negative number"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a non-negative number"),
    "momentum": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"in 0..{MAX_SEED}"),
    "limit": (lambda v: v is None or v > 0, "a positive number of images"),
    "val": (lambda v: v >= 0, "a number of images >= 0"),
    "threads": (lambda v: v is None or 1 <= v <= 1024, "in 1..1024"),
    "world_size": (lambda v: v >= 1, "a positive number of processes"),
}

# TrainArgs fields added after checkpoint format 2 shipped, with the value that a file written
# before them means (every such file was trained by one process, BatchNorm unsynchronized).
# Readers fill them in before validating: the validator wants every field present.
ADDED_TRAIN_FIELDS: dict[str, Any] = {"world_size": 1, "sync_bn": False}


@dataclass(frozen=True)
class RunSpec:
    """One run: the model and how it is trained. Options are addressed by their flat names."""

    model: ModelArgs = ModelArgs()
    train: TrainArgs = TrainArgs()

    @classmethod
    def from_options(cls, **options: Any) -> RunSpec:
        """Build from flat option names (dataset=..., norm=..., batch_size=...)."""
        unknown = set(options) - set(RUN_OPTIONS)
        if unknown:
            raise NormcliError(
                f"unknown run option {sorted(unknown)[0]!r}; available: {', '.join(RUN_OPTIONS)}"
            )
        parts: dict[type, dict[str, Any]] = {ModelArgs: {}, TrainArgs: {}}
        for name, value in options.items():
            parts[RUN_OPTIONS[name]][name] = value
        return cls(ModelArgs(**parts[ModelArgs]), TrainArgs(**parts[TrainArgs]))

    def options(self) -> dict[str, Any]:
        """Every option by its flat name."""
        return {**dataclasses.asdict(self.model), **dataclasses.asdict(self.train)}

    def resolve(self) -> RunSpec:
        """Both records with every default filled in and validated."""
        model = self.model.resolve()
        return RunSpec(model, self.train.resolve(model))

    @property
    def label(self) -> str:
        """Short human label, e.g. 'BN + L1 (1e-4)', 'GN (G=2) + WS'; several processes add
        the per-process batch, e.g. 'BN [2 procs x 8, sync]' (sync: synchronized BatchNorm)."""
        m, t = self.model, self.train
        label = norm_label(m.norm, m.groups, t.l1, bool(m.ws))
        if t.world_size > 1 or t.sync_bn:
            procs = f"{t.world_size} proc{'s' if t.world_size != 1 else ''}"
            label += f" [{procs} x {t.per_process_batch}{', sync' if t.sync_bn else ''}]"
        return label

    def default_path(self) -> Path:
        """checkpoints/<dataset>_<model>_<norm>[-g<G>][-ws|-nows][_l1-<lambda>][_<recipe>]_s<seed>
        .safetensors. -ws / -nows appear only where the choice differs from the norm's default;
        <recipe> lists the training options that differ from the dataset's defaults (epochs,
        batch size, learning rate, limit, ...), so a quick trial never takes a full run's name."""
        m, t = self.model, self.train
        norm = m.norm + (f"-g{m.groups}" if m.groups else "")
        if m.ws is not None and m.ws != get_norm(m.norm).ws_default:
            norm += "-ws" if m.ws else "-nows"
        l1 = f"_l1-{format_lambda(t.l1)}" if t.l1 else ""
        recipe = "".join(f"_{tag}{_compact(v)}" for tag, v in self._recipe_changes().items())
        name = f"{m.dataset}_{m.model}_{norm}{l1}{recipe}_s{t.seed}.safetensors"
        return CHECKPOINT_DIR / name

    def _recipe_changes(self) -> dict[str, Any]:
        """Short tag -> value for every training option that differs from its default."""
        defaults = dataclasses.replace(
            TrainArgs().resolve(self.model), threads=default_threads(self.train.world_size)
        )
        tags = {"epochs": "e", "batch_size": "b", "lr": "lr", "momentum": "m",
                "weight_decay": "wd", "augment": "aug", "limit": "n", "val": "val",
                "channels_last": "cl", "threads": "t", "world_size": "np",
                "sync_bn": "sync"}  # fmt: skip
        return {
            tag: getattr(self.train, name)
            for name, tag in tags.items()
            if getattr(self.train, name) != getattr(defaults, name)
        }


def _compact(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return format_lambda(value) if value and abs(value) < 1e-2 else f"{value:g}"
    return str(value)


# Flat option name -> the record that holds it. Names are unique across the two records.
RUN_OPTIONS: dict[str, type] = {
    **{f.name: ModelArgs for f in dataclasses.fields(ModelArgs)},
    **{f.name: TrainArgs for f in dataclasses.fields(TrainArgs)},
}


# ---------------------------------------------------------------------------
# The one validator: JSON values against dataclass / TypedDict type hints
# ---------------------------------------------------------------------------


def check_type(value: Any, hint: Any) -> str | None:
    """None when `value` (decoded JSON) fits type `hint`, else what is wrong with it.

    Understands the hints normcli's records use: bool, int, float (an int is accepted),
    str, None, X | Y, list[X], tuple[X, ...], dict[str, X], dataclasses and TypedDicts
    (as JSON objects). Numbers must be finite: JSON from a checkpoint must not smuggle in NaN.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [check_type(value, arg) for arg in args]
        return None if None in problems else next(p for p in problems if p)
    if origin in (list, tuple):
        return _check_items(value, args[0] if args else Any)
    if origin is dict:
        if not isinstance(value, dict):
            return "expected an object"
        return _check_items(list(value.values()), args[1] if args else Any)
    if dataclasses.is_dataclass(hint) or typing.is_typeddict(hint):
        return _check_fields(value, hint)
    if hint not in _SCALARS:
        raise TypeError(f"check_type does not understand {hint!r}")  # a programming error
    return _SCALARS[hint](value)


def _check_number(value: Any, kind: type) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {type(value).__name__}"
    if kind is int and not isinstance(value, int):
        return "expected an integer"
    return None if math.isfinite(value) else f"{value} is not a finite number"


_SCALARS: dict[Any, Any] = {
    bool: lambda v: None if isinstance(v, bool) else "expected true or false",
    int: lambda v: _check_number(v, int),
    float: lambda v: _check_number(v, float),
    str: lambda v: None if isinstance(v, str) else "expected a string",
    type(None): lambda v: None if v is None else "expected null",
    Any: lambda v: None,
}


def _check_items(value: Any, item: Any) -> str | None:
    if not isinstance(value, list):
        return "expected a list"
    for i, v in enumerate(value):
        problem = check_type(v, item)
        if problem:
            return f"item {i}, {problem}"
    return None


def _check_fields(value: Any, cls: Any) -> str | None:
    if not isinstance(value, dict):
        return "expected an object"
    hints = typing.get_type_hints(cls)
    # A stored record holds every field, defaults included: a file says what it meant.
    required = set(hints) if dataclasses.is_dataclass(cls) else set(cls.__required_keys__)
    for name in sorted(required - set(value)):
        return f"{name!r} missing"
    for name in value:
        if name not in hints:
            return f"unknown field {name!r}"
        problem = check_type(value[name], hints[name])
        if problem:
            return f"{name!r} has the wrong type ({problem})"
    return None


def from_json(cls: type[Any], value: Any, what: str) -> Any:
    """Build dataclass `cls` from a decoded JSON object, after checking every field's type
    against its hint; NormcliError names `what` and the first problem."""
    problem = check_type(value, cls)
    if problem:
        raise NormcliError(f"{what}: {problem}")
    hints = typing.get_type_hints(cls)
    # JSON has no tuples; the records' tuple fields are rebuilt from lists.
    return cls(**{
        k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in value.items()
    })  # fmt: skip
