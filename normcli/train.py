"""Training: config with per-dataset defaults, the loop, the L1 term, one-cycle schedule, history.

The checkpoint is rewritten atomically after every epoch with what resuming
needs (optimizer buffers, scheduler state, RNG states), so an interrupted run
continues with `resume_training` to exactly the weights an uninterrupted run
would have reached (on the CPU, same seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from normcli.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    check_writable,
    load_checkpoint,
    save_checkpoint,
)
from normcli.data import DEFAULT_AUGMENT, Augment, batches, get_spec, load_split
from normcli.errors import NormcliError
from normcli.evaluate import evaluate
from normcli.models import (
    build_model,
    count_params,
    default_model,
    get_model_info,
    resolve_groups,
)
from normcli.norms import resolve_ws

CHECKPOINT_DIR = Path("checkpoints")

# Defaults per dataset, chosen for the targets in the README's Results section.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # MNIST: batch 64 gives the 9k-parameter net twice the steps; LN needs them to pass
    # 99.4% in the last epochs (measured: LN 99.44% at batch 128, 99.53% at 64).
    "mnist": {"epochs": 15, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "dropout": 0.0},
    # CIFAR-10: the 50k-parameter net underfits in 20 epochs (batch 128, 4 px crops, weight
    # decay 5e-4: BN + L1 80.6%, train accuracy 81.9%), so fit more: 2 px crops, a tenth of
    # the weight decay, and more steps (batch 32, but see NORM_DEFAULTS for BN).
    "cifar10": {"epochs": 20, "batch_size": 32, "lr": 0.1, "weight_decay": 5e-5, "dropout": 0.0},
}
# Where one norm does best with other defaults than its dataset's. BatchNorm normalizes with
# the statistics of its batch, which get noisier as the batch shrinks; the batch-free norms
# only gain the extra steps. Measured on CIFAR-10 from batch 64 to 32: BN + L1 82.11% ->
# 81.36%, GN 80.30% -> 80.52%, LN 79.70% -> 81.21% (bench/results/cifar10_tuning).
NORM_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("cifar10", "bn"): {"batch_size": 64},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers; None means the dataset's default."""

    dataset: str = "mnist"
    model: str | None = None
    norm: str = "bn"
    groups: int | None = None
    ws: bool | None = None  # weight-standardized convolutions; None: the norm's default
    dropout: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # peak learning rate of the one-cycle schedule
    momentum: float = 0.9  # SGD (Nesterov) momentum
    weight_decay: float | None = None
    l1: float = 0.0  # lambda of the L1 term: lambda * sum |w| over trainable parameters
    seed: int = 1
    augment: bool = True
    limit: int | None = None  # train and test on the first N images only
    channels_last: bool = True

    def resolve(self) -> TrainConfig:
        """Fill in dataset/model defaults and validate; the result is stored in checkpoints."""
        spec = get_spec(self.dataset)
        model = self.model or default_model(self.dataset)
        info = get_model_info(model)
        if info.dataset != spec.name:
            raise NormcliError(f"model {model} is for {info.dataset}, not {spec.name}")
        defaults = DATASET_DEFAULTS[spec.name] | NORM_DEFAULTS.get((spec.name, self.norm), {})
        filled = dataclasses.replace(
            self,
            model=model,
            groups=resolve_groups(model, self.norm, self.groups),
            ws=resolve_ws(self.norm, self.ws),
            **{k: v for k, v in defaults.items() if getattr(self, k) is None},
        )
        filled.validate()
        return filled

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if value is None or not math.isfinite(value) or value <= 0:
                raise NormcliError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("l1", "weight_decay", "momentum"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise NormcliError(
                    f"--{name.replace('_', '-')} must be a non-negative number, got {value}"
                )
        if self.limit is not None and self.limit <= 0:
            raise NormcliError(f"--limit must be a positive number of images, got {self.limit}")
        with torch.device("meta"):  # refuses bad groups/dropout before any data is read
            build_model(
                self.model, norm=self.norm, groups=self.groups, dropout=self.dropout, ws=self.ws
            )

    def default_path(self) -> Path:
        """checkpoints/<dataset>_<model>_<norm>[-g<G>][-ws|-nows][_l1-<lambda>]_s<seed>.safetensors

        -ws / -nows appear only where the choice differs from the norm's default."""
        norm = self.norm + (f"-g{self.groups}" if self.groups else "")
        if self.ws is not None and self.ws != resolve_ws(self.norm, None):
            norm += "-ws" if self.ws else "-nows"
        l1 = f"_l1-{self.l1:g}" if self.l1 else ""
        return CHECKPOINT_DIR / f"{self.dataset}_{self.model}_{norm}{l1}_s{self.seed}.safetensors"


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of absolute values of all trainable parameters (the course's L1 term)."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NormcliError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise NormcliError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


class Reporter(Protocol):
    """Receives progress; the CLI shows it as a rich progress bar on stderr."""

    def start_epoch(self, epoch: int, epochs: int, num_batches: int) -> None: ...

    def batch(self, done: int, loss: float, accuracy: float, images_per_s: float) -> None: ...

    def end_epoch(self, row: dict[str, float]) -> None: ...


class SilentReporter:
    """A Reporter that shows nothing (library use, benchmarks)."""

    def start_epoch(self, epoch: int, epochs: int, num_batches: int) -> None:
        pass

    def batch(self, done: int, loss: float, accuracy: float, images_per_s: float) -> None:
        pass

    def end_epoch(self, row: dict[str, float]) -> None:
        pass


@dataclass
class _State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    generator: torch.Generator
    history: list[dict[str, float]]


def _warmup_fraction(total_steps: int) -> float:
    """One-cycle warm-up share: 25%, but at least 2 steps; OneCycleLR divides by zero when
    the warm-up ends exactly at step 1 (e.g. 4 steps in all)."""
    return 0.25 if total_steps >= 8 else 0.75 if total_steps <= 2 else 2 / total_steps


def _make_state(config: TrainConfig, steps_per_epoch: int, device: torch.device) -> _State:
    torch.manual_seed(config.seed)  # weight init and dropout
    model = build_model(
        config.model,
        norm=config.norm,
        groups=config.groups,
        dropout=config.dropout,
        ws=config.ws,
    )
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=_warmup_fraction(config.epochs * steps_per_epoch),
        div_factor=10.0,
        final_div_factor=100.0,
        cycle_momentum=False,
    )
    generator = torch.Generator(device=device).manual_seed(config.seed)
    return _State(model, optimizer, scheduler, generator, [])


def _resume_tensors(state: _State) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Optimizer/scheduler/RNG state as (JSON-able metadata, tensors)."""
    opt = state.optimizer.state_dict()
    tensors = {
        f"optim.{i}.{name}": value
        for i, buffers in opt["state"].items()
        for name, value in buffers.items()
        if isinstance(value, torch.Tensor)
    }
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = state.generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "epoch": len(state.history),
        "optimizer_param_groups": opt["param_groups"],
        "scheduler": state.scheduler.state_dict(),
    }
    return meta, tensors


# Scheduler / optimizer-group entries that change with every step; all others follow
# from the config and the data size, and must match a freshly built run's.
_SCHEDULER_STEP_KEYS = ("last_epoch", "_step_count", "_last_lr")
_GROUP_STEP_KEYS = ("lr",)


def _restore(state: _State, ckpt: Checkpoint, config: TrainConfig, steps: int) -> None:
    """Load weights, optimizer, scheduler and RNG states, after checking they fit this run."""
    resume = ckpt.meta.resume
    if not resume:
        raise NormcliError(f"{ckpt.path}: holds no resume state")
    scheduler, groups = _check_resume(state, ckpt, config, steps)
    try:
        state.model.load_state_dict(ckpt.model.state_dict())
        buffers: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in ckpt.extra.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                buffers.setdefault(int(index), {})[name] = value
        state.optimizer.load_state_dict({"state": buffers, "param_groups": groups})
        state.scheduler.load_state_dict(scheduler)
        torch.set_rng_state(ckpt.extra["rng.torch"])
        state.generator.set_state(ckpt.extra["rng.data"].to("cpu"))
        if "rng.cuda" in ckpt.extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.extra["rng.cuda"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NormcliError(f"{ckpt.path}: resume state is unusable ({reason})") from None
    state.history = list(ckpt.meta.history)


def _check_resume(
    state: _State, ckpt: Checkpoint, config: TrainConfig, steps: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate the stored resume state against a fresh run of `config`.

    Returns the scheduler state and optimizer param groups to load: the fresh
    ones with the stored per-step values, so nothing unchecked reaches torch.
    """
    where, meta, resume = ckpt.path, ckpt.meta, ckpt.meta.resume or {}

    def bad(what: str) -> NormcliError:
        return NormcliError(f"{where}: resume state does not fit this run ({what})")

    # metadata field -> TrainConfig field: the model description must match the config
    described = {"model": "model", "norm": "norm", "groups": "groups", "dataset": "dataset",
                 "dropout": "dropout", "weight_standardization": "ws"}  # fmt: skip
    for key, config_key in described.items():
        if getattr(meta, key) != getattr(config, config_key):
            raise bad(f"{key.replace('_', ' ')} differs from the training config")
    epoch = len(meta.history)
    if resume.get("epoch") != epoch or epoch > config.epochs:
        raise bad(f"epoch {resume.get('epoch')!r} with {epoch} history rows")
    if [row["epoch"] for row in meta.history] != list(range(1, epoch + 1)):
        raise bad("history epochs are not 1, 2, ...")

    fresh = _json_roundtrip(state.scheduler.state_dict())
    saved = resume.get("scheduler")
    if not isinstance(saved, dict):
        raise bad("no scheduler state")
    for key, value in fresh.items():
        if key not in _SCHEDULER_STEP_KEYS and key in saved and saved[key] != value:
            raise bad(f"scheduler {key} differs; same data and --limit as the first run?")
    last_epoch, step_count, last_lr = (saved.get(k) for k in _SCHEDULER_STEP_KEYS)
    if not _is_int(last_epoch) or last_epoch != epoch * steps or step_count != last_epoch + 1:
        raise bad(f"scheduler step {last_epoch!r} after {epoch} epochs of {steps} steps")
    if (
        not isinstance(last_lr, list)
        or len(last_lr) != len(fresh["_last_lr"])
        or not all(_is_finite(v) for v in last_lr)
    ):
        raise bad("scheduler learning rates")
    scheduler = {**fresh, "last_epoch": last_epoch, "_step_count": step_count, "_last_lr": last_lr}

    fresh_groups = _json_roundtrip(state.optimizer.state_dict()["param_groups"])
    saved_groups = resume.get("optimizer_param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(fresh_groups):
        raise bad("optimizer param groups")
    groups = []
    for fresh_group, saved_group, lr in zip(fresh_groups, saved_groups, last_lr, strict=True):
        if not isinstance(saved_group, dict) or saved_group.get("lr") != lr:
            raise bad("optimizer learning rate")
        for key, value in fresh_group.items():
            if key not in _GROUP_STEP_KEYS and key in saved_group and saved_group[key] != value:
                raise bad(f"optimizer {key} differs from the training config")
        groups.append({**fresh_group, "lr": lr})

    params = list(state.model.parameters())
    for key, value in ckpt.extra.items():
        if not key.startswith("optim."):
            continue
        _, index, name = (*key.split(".", 2), "", "")[:3]
        i = int(index) if index.isascii() and index.isdigit() else -1
        if name != "momentum_buffer" or not 0 <= i < len(params):
            raise bad(f"unexpected tensor {key!r}")
        if value.shape != params[i].shape or value.dtype != params[i].dtype:
            raise bad(f"tensor {key!r} has shape {tuple(value.shape)}")
    buffers = sum(k.startswith("optim.") for k in ckpt.extra)
    if config.momentum and epoch and buffers != len(params):
        raise bad(f"{buffers} momentum buffers for {len(params)} parameters")
    return scheduler, groups


def _json_roundtrip(value: Any) -> Any:
    """`value` as it reads back from checkpoint metadata (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _train_epoch(
    state: _State,
    config: TrainConfig,
    train_split: Any,
    augment: Augment | None,
    reporter: Reporter,
) -> tuple[float, float]:
    """One pass over the training split; returns (mean loss, accuracy %)."""
    spec = get_spec(config.dataset)
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    model.train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    device = train_split.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    num_batches = -(-len(train_split) // config.batch_size)
    for i, (x, y) in enumerate(
        batches(
            train_split,
            spec,
            config.batch_size,
            shuffle=True,
            augment=augment,
            generator=state.generator,
        )  # fmt: skip
    ):
        logits = model(x.contiguous(memory_format=memory_format))
        loss = F.cross_entropy(logits, y)
        objective = loss + config.l1 * l1_penalty(model) if config.l1 else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: no host sync per step.
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if i % 20 == 19 or i == num_batches - 1:
            elapsed = time.perf_counter() - start
            reporter.batch(
                i + 1, loss_sum.item() / seen, 100.0 * correct.item() / seen, seen / elapsed
            )
    return loss_sum.item() / max(seen, 1), 100.0 * correct.item() / max(seen, 1)


@dataclass
class TrainResult:
    path: Path
    history: list[dict[str, float]]
    params: int


def train(
    config: TrainConfig,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    resume_from: Checkpoint | None = None,
) -> TrainResult:
    """Train a model as `config` says and write its checkpoint after every epoch."""
    config = config.resolve()
    dev = resolve_device(device)
    path = Path(out) if out is not None else config.default_path()
    if out is not None or path.parent.is_dir():  # the default folder is made after the data loads
        check_writable(path)
    if resume_from is None and path.exists() and not overwrite:
        raise NormcliError(f"{path} exists; pass --overwrite to replace it, or --out elsewhere")
    reporter = reporter or SilentReporter()
    spec = get_spec(config.dataset)
    saved = len(resume_from.meta.history) if resume_from is not None else 0  # epochs in the file
    try:
        train_split = load_split(config.dataset, True, data_dir, limit=config.limit).to(dev)
        test_split = load_split(config.dataset, False, data_dir, limit=config.limit).to(dev)
        augment = DEFAULT_AUGMENT[config.dataset] if config.augment else None
        steps = -(-len(train_split) // config.batch_size)
        state = _make_state(config, steps, dev)
        if resume_from is not None:
            _restore(state, resume_from, config, steps)
        if out is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_writable(path)
        base_meta = CheckpointMeta(
            model=config.model,
            norm=config.norm,
            groups=config.groups,
            weight_standardization=config.ws,
            dropout=float(config.dropout),
            dataset=config.dataset,
            class_names=list(spec.class_names),
            input_shape=list(spec.input_shape),
            mean=list(spec.mean),
            std=list(spec.std),
            config=dataclasses.asdict(config),
        )
        for epoch in range(len(state.history), config.epochs):
            _run_epoch(state, config, epoch, steps, train_split, test_split, augment, reporter)
            resume_meta, extra = _resume_tensors(state)
            meta = dataclasses.replace(base_meta, history=list(state.history), resume=resume_meta)
            save_checkpoint(path, state.model, meta, extra)  # atomic: the epoch is in, or not
            saved = epoch + 1
            reporter.end_epoch(state.history[-1])
    except KeyboardInterrupt:
        raise _interrupted(path, saved, config.epochs, data_dir) from None
    return TrainResult(path, state.history, count_params(state.model))


def _run_epoch(
    state: _State,
    config: TrainConfig,
    epoch: int,
    steps: int,
    train_split: Any,
    test_split: Any,
    augment: Augment | None,
    reporter: Reporter,
) -> None:
    """Train one epoch, evaluate, and append the epoch's row to `state.history`."""
    spec = get_spec(config.dataset)
    reporter.start_epoch(epoch + 1, config.epochs, steps)
    start = time.perf_counter()
    train_loss, train_acc = _train_epoch(state, config, train_split, augment, reporter)
    seconds = time.perf_counter() - start
    lr = state.scheduler.get_last_lr()[0]
    test = evaluate(state.model, test_split, spec)
    row = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "lr": lr,
        "seconds": seconds,
        "images_per_second": len(train_split) / seconds,
    }
    state.history.append(row)


def _interrupted(
    path: Path, saved: int, epochs: int, data_dir: str | os.PathLike[str] | None
) -> NormcliError:
    if saved == 0:
        return NormcliError("interrupted during epoch 1; nothing was saved", exit_code=130)
    data = f" --data-dir {data_dir}" if data_dir is not None else ""
    return NormcliError(
        f"interrupted; epochs 1-{saved} of {epochs} are saved in {path}; "
        f"resume with: normcli train --resume {path}{data}",
        exit_code=130,
    )


def resume_training(
    path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> TrainResult:
    """Continue the run saved in `path` to its configured epoch count, in place."""
    ckpt = load_checkpoint(path)
    config = _config_from_meta(ckpt.meta.config, ckpt.path)
    return train(
        config, data_dir=data_dir, device=device, out=path, reporter=reporter, resume_from=ckpt
    )


def _config_from_meta(raw: dict[str, Any], where: Path) -> TrainConfig:
    """The TrainConfig stored in a checkpoint, every field present and of its declared type."""
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    # Checkpoints from before weight standardization existed trained with plain convolutions.
    raw = {"ws": False, **raw}
    for name, hint in hints.items():
        if name not in raw:
            raise NormcliError(f"{where}: training config is incomplete, {name!r} missing")
        if not _has_type(raw[name], hint):
            raise NormcliError(f"{where}: training config {name!r} has the wrong type")
        values[name] = raw[name]
    try:
        return TrainConfig(**values).resolve()
    except NormcliError as e:
        raise NormcliError(f"{where}: training config is invalid ({e})") from None


def _has_type(value: Any, hint: Any) -> bool:
    """isinstance for the simple hints TrainConfig uses (int, float, str, bool, X | None)."""
    for kind in typing.get_args(hint) or (hint,):
        if value is None and kind is type(None):
            return True
        if isinstance(value, bool):
            if kind is bool:
                return True
            continue
        numeric = kind is float and isinstance(value, (int, float))
        if numeric or (kind in (int, str) and isinstance(value, kind)):
            return True
    return False
