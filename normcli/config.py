"""The run description: what rebuilds a model (`ModelArgs`), how it was trained (`TrainArgs`),
and the two together (`RunSpec`).

Both records are stored once in every checkpoint, under their own metadata keys, with the
same field names users type as options (`--batch-size` is `batch_size`). A field left None
means "the default": `resolve()` fills it from the dataset, model and norm records, and the
resolved record is what a checkpoint holds (read back by normcli.schema's validator).

Each field is a run option declared once, with `option()`: its help text, its tag in the
default checkpoint name, its range and its value in files written before it existed live
in the field's metadata, and the CLI, the names and the readers take them from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normcli.data import DATASETS, get_dataset
from normcli.errors import NormcliError
from normcli.models import build_model, check_model_fits, default_model, resolve_groups
from normcli.norms import NORMS, format_lambda, get_norm, norm_label, resolve_ws
from normcli.runtime import default_threads

CHECKPOINT_DIR = Path("checkpoints")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; stay within a signed int64
# The training step's precisions; "auto" is decided per device when the run starts.
PRECISIONS = ("auto", "fp32", "bf16")


def option(
    default: Any,
    help: str | None = None,
    *,
    tag: str | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
    choices: Mapping[str, Any] | None = None,
    before: Any = dataclasses.MISSING,
) -> Any:
    """A field of the run description, declared once with everything about it: `help`, the
    option's help text (a field without it is not an option users type); `tag`, its short
    name in the default checkpoint name when the value differs from the default (training
    options); `check`, (does a value fit, what it must be); `choices`, the table of valid
    names; `before`, what a checkpoint written before the field existed means."""
    meta = {"help": help, "tag": tag, "check": check, "choices": choices}
    if before is not dataclasses.MISSING:
        meta["before"] = before
    return dataclasses.field(default=default, metadata=meta)


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


_POSITIVE = (lambda v: _finite(v) and v > 0, "positive")
_NON_NEGATIVE = (lambda v: _finite(v) and v >= 0, "a non-negative number")


@dataclass(frozen=True)
class ModelArgs:
    """What rebuilds the model: the network, its norm, and the dataset it classifies."""

    dataset: str = option("mnist", "Dataset to train on.", choices=DATASETS)
    model: str | None = option(  # None: the default model for the dataset
        None, "Registry name (see `normcli summary --list`). Default: the dataset's."
    )
    norm: str = option("bn", "bn, gn (GroupNorm), ln (GroupNorm(1, C)), in, none.", choices=NORMS)
    groups: int | None = option(  # GroupNorm groups; None: the model's default (gn only)
        None, "Groups for gn (default: the model's, see `normcli summary --list`)."
    )
    ws: bool | None = option(  # weight-standardized convolutions; None: the norm's default
        None, "Weight-standardized convolutions. Default: on for gn, ln, in; off for bn, none."
    )
    dropout: float | None = option(None, "Dropout rate (model option). Default: the dataset's (0).")
    num_classes: int | None = None  # size of the head; None: the dataset's class count

    def resolve(self) -> ModelArgs:
        """Every default filled in and checked against the dataset, model and norm records."""
        _check_ranges(self)
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

    epochs: int | None = option(
        None, "Default: 15 for the 28x28 datasets, 20 for CIFAR.", tag="e", check=_POSITIVE
    )
    batch_size: int | None = option(  # images per optimizer step
        None,
        "Images per step, over all processes (--nproc). Default: 64 for 28x28; "
        "32 for CIFAR, 64 with bn.",
        tag="b",
        check=_POSITIVE,
    )
    lr: float | None = option(  # peak learning rate of the one-cycle schedule
        None,
        "Peak one-cycle learning rate. Default: 0.05 for 28x28, 0.1 for CIFAR.",
        tag="lr",
        check=_POSITIVE,
    )
    momentum: float = option(
        0.9,
        "SGD Nesterov momentum, in [0, 1).",
        tag="m",
        check=(lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    )
    weight_decay: float | None = option(
        None,
        "SGD weight decay. Default: 0 for 28x28, 5e-5 for CIFAR.",
        tag="wd",
        check=_NON_NEGATIVE,
    )
    l1: float = option(  # lambda of the L1 term: lambda * sum |w| over trainable parameters
        0.0, "L1 lambda: adds lambda * sum|w| to the loss.", check=_NON_NEGATIVE
    )
    seed: int = option(
        1,
        "Seed for init, data order, augmentation and the validation split.",
        check=(lambda v: 0 <= v <= MAX_SEED, f"in 0..{MAX_SEED}"),
    )
    augment: bool = option(True, "The dataset's batch augmentation, on the device.", tag="aug")
    limit: int | None = option(  # train and test on the first N images only
        None,
        "Use only the first N images of each split.",
        tag="n",
        check=(lambda v: v is None or v > 0, "a positive number of images"),
    )
    val: int = option(
        0,
        "Hold out N training images (chosen by the seed) as a validation split.",
        tag="val",
        check=(lambda v: v >= 0, "a number of images >= 0"),
    )
    channels_last: bool | None = option(  # None: chosen when the run starts (normcli.tuning)
        None,
        "channels_last memory layout for training. Default: the faster one on this CPU, by a "
        "short timed trial (cached; $NORMCLI_TUNE=0: on, off for gn); recorded.",
        tag="cl",
    )
    threads: int | None = option(  # CPU threads per process; None: see resolve()
        None,
        "CPU threads per process. Default: torch's (all cores, or $OMP_NUM_THREADS); "
        "with several processes, the cores shared out among them; recorded.",
        tag="t",
        check=(lambda v: v is None or 1 <= v <= 1024, "in 1..1024"),
    )
    # Data parallelism: batch_size is the global batch, split evenly over world_size
    # processes (set by the launcher, not by the user); sync_bn normalizes BatchNorm over
    # the global batch instead of each process's share. Both were added after checkpoint
    # format 2 shipped; every file written before them was trained by one process.
    world_size: int = option(
        1, tag="np", check=(lambda v: v >= 1, "a positive number of processes"), before=1
    )
    sync_bn: bool = option(
        False,
        "With several processes: BatchNorm over the global batch, not each process's "
        "share (bn only).",
        tag="sync",
        before=False,
    )
    # The recipe, added after format 2 too: files written before it trained in float32,
    # without a weight average or label smoothing.
    precision: str = option(  # the training step's autocast; auto: decided by normcli.tuning
        "auto",
        "Training step's precision (evaluation stays fp32). auto: bf16 on GPUs with bf16 and "
        "CPUs with amx_bf16/avx512_bf16 where a short timed trial finds it faster "
        "($NORMCLI_TUNE=0: without the trial), else fp32; recorded.",
        tag="p",
        check=(lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        choices=dict.fromkeys(PRECISIONS),
        before="fp32",
    )
    ema: float = option(  # decay of the weights' moving average, evaluated and saved; 0: off
        0.0,
        "Evaluate and save a moving average of the weights with this decay (e.g. 0.999); 0: off.",
        tag="ema",
        check=(lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
        before=0.0,
    )
    label_smoothing: float = option(
        0.0,
        "Label smoothing of the training loss, in [0, 1) (e.g. 0.1).",
        tag="ls",
        check=(lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
        before=0.0,
    )

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
        # precision "auto" and channels_last None stay: the device decides them when the run
        # starts (normcli.tuning.settle), and the checkpoint records what it chose.
        filled = dataclasses.replace(
            self, **{k: v for k, v in missing.items() if getattr(self, k) is None}
        )
        filled.validate(model)
        return filled

    def validate(self, model: ModelArgs | None = None) -> None:
        """Refuse values outside their ranges, naming the parameter; with `model`, also the
        options that depend on it."""
        _check_ranges(self)
        if self.limit is not None and self.val >= self.limit:  # found here, before any data loads
            raise NormcliError(
                f"val {self.val} leaves no training images of the {self.limit} that limit keeps"
            )
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


def _check_ranges(record: Any) -> None:
    """Refuse a field of a run record whose value is outside its range, naming the field."""
    for f in dataclasses.fields(record):
        if f.metadata.get("check"):
            fits, wanted = f.metadata["check"]
            value = getattr(record, f.name)
            if not fits(value):
                raise NormcliError(f"{f.name} must be {wanted}, got {value}")


def with_added_fields(record: type, values: dict[str, Any]) -> dict[str, Any]:
    """A stored record's `values`, with the fields added since it was written (their
    `before` value) filled in: the validator wants every field present."""
    fields = dataclasses.fields(record)
    return {**{f.name: f.metadata["before"] for f in fields if "before" in f.metadata}, **values}


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
            type(self.train)().resolve(self.model),
            threads=default_threads(self.train.world_size),
        )
        return {
            f.metadata["tag"]: getattr(self.train, f.name)
            for f in dataclasses.fields(self.train)
            if f.metadata.get("tag") and getattr(self.train, f.name) != getattr(defaults, f.name)
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
# The options users type: the fields with help text. The others are derived (num_classes, from
# the dataset) or set by whoever starts the processes (world_size, by --nproc or a launcher).
TYPED_OPTIONS: tuple[str, ...] = tuple(
    f.name for r in (ModelArgs, TrainArgs) for f in dataclasses.fields(r) if f.metadata.get("help")
)


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """`normcli train`'s flags for run option values, e.g. ['--norm', 'gn', '--no-ws']: the
    options users type, None (the default) left out, a float spelled as it reads back exact."""
    flags: list[str] = []
    for name, value in options.items():
        if value is None or name not in TYPED_OPTIONS:
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    return flags
