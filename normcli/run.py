"""A run in progress (`Run`): built from its description (`start_run`, `new_run`), saved
after every epoch (`save_run`) and continued from its checkpoint (`restore_run`).

The checkpoint holds what cannot be derived from the run description: weights and buffers,
momentum buffers and RNG states (with --ema, the file's model is the weights' average and
the live weights travel beside it: normcli.ema). Resuming rebuilds everything else (the
one-cycle schedule from the config and the epoch count), so an interrupted run continues to
exactly the weights an uninterrupted run would reach (on the CPU, same seed and thread
count). With
several processes rank 0 writes, after gathering every process's RNG states; the
checkpoint is an ordinary one-process model. The training loop: normcli.train.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from normcli.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    EpochRecord,
    ResumeState,
    save_checkpoint,
    utc_now,
)
from normcli.config import RunSpec, TrainArgs
from normcli.data import Augment, Dataset, Split, get_dataset, load_split
from normcli.ema import live_tensors, weight_average
from normcli.ema import restore as restore_average
from normcli.errors import NormcliError
from normcli.machine import describe_machine
from normcli.parallel import (
    World,
    barrier,
    convert_sync_batchnorm,
    current_world,
    gather_to_main,
    local_main_first,
    share_from_main,
    wrap_ddp,
)
from normcli.runtime import interrupts_held, resolve_device
from normcli.tuning import choose, settle


@dataclass
class Run:
    """A run in progress: its resolved description, data, network, optimizer and history."""

    spec: RunSpec
    dataset: Dataset
    device: torch.device
    train_split: Split
    test_split: Split
    val_split: Split | None
    augment: Augment | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    generator: torch.Generator  # data order and augmentation (the same in every process)
    history: list[EpochRecord] = field(default_factory=list)
    world: World = field(default_factory=World)  # this process among the run's processes
    ddp: nn.Module | None = None  # with several processes: DDP around `model`, for training
    saved_epochs: int = 0  # epochs in the checkpoint last written (or resumed from)
    ema: AveragedModel | None = None  # with --ema: the weights' average, evaluated and saved
    started: str | None = field(default_factory=utc_now)  # first start; resumed: the file's

    @property
    def evaluated(self) -> nn.Module:
        """The network that is evaluated and saved: the weights' average with --ema."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.train_split) // self.spec.train.batch_size)

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.history)

    @property
    def done(self) -> bool:
        return self.epoch >= self.spec.train.epochs

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.spec.train.channels_last else torch.contiguous_format


def _warmup_fraction(total_steps: int) -> float:
    """One-cycle warm-up share: 25%, but at least 2 steps; OneCycleLR divides by zero when
    the warm-up ends exactly at step 1 (e.g. 4 steps in all)."""
    return 0.25 if total_steps >= 8 else 0.75 if total_steps <= 2 else 2 / total_steps


def start_run(
    spec: RunSpec,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    resume_from: Checkpoint | None = None,
    world: World | None = None,
) -> Run:
    """Everything a run needs, built from its description: its data read onto the device, the
    seeded network, SGD and the one-cycle schedule; continued from `resume_from` when given.
    `world`: this process's place in the run (default: the initialized process group's)."""
    spec = spec.resolve()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    world = world or current_world()
    m, t = spec.model, spec.train
    with local_main_first(world):  # a missing dataset is downloaded once per machine
        train_split = load_split(m.dataset, True, data_dir, limit=t.limit)
        test_split = load_split(m.dataset, False, data_dir, limit=t.limit)
    run = new_run(spec, train_split, test_split, dev, world)
    if resume_from is not None:
        restore_run(run, resume_from)
    return run


def new_run(
    spec: RunSpec,
    train_split: Split,
    test_split: Split,
    device: torch.device,
    world: World | None = None,
) -> Run:
    """A fresh run of `spec` (resolved) on splits already in memory: holds out the validation
    images, decides the precision and layout (normcli.tuning), moves the data to `device`,
    seeds and builds the network, optimizer and schedule. With several processes (`world`,
    default: the initialized process group's) every one calls this: BatchNorm is
    synchronized when the spec says so and DDP wraps the network."""
    t = spec.train
    world = world or current_world()
    train_split, val_split = _training_splits(spec, train_split, world)
    spec = _settled(spec, device, world)
    model = _network(spec, device, world)
    optimizer, scheduler = _optimizer(model, t, -(-len(train_split) // t.batch_size))
    dataset = get_dataset(spec.model.dataset)
    return Run(
        spec=spec,
        dataset=dataset,
        device=device,
        train_split=train_split.to(device),
        test_split=test_split.to(device),
        val_split=val_split.to(device) if val_split is not None else None,
        augment=dataset.augment if t.augment else None,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=torch.Generator(device=device).manual_seed(t.seed),
        world=world,
        ema=weight_average(model, t.ema) if t.ema else None,  # a copy of the bare network,
        ddp=wrap_ddp(model, device) if world.size > 1 else None,  # before DDP's hooks
    )


def _training_splits(spec: RunSpec, split: Split, world: World) -> tuple[Split, Split | None]:
    """(training, validation) splits of `spec`, checked against the run's processes."""
    t = spec.train
    if t.world_size != world.size:
        raise NormcliError(
            f"world_size {t.world_size}: this run has {world.size} "
            f"process{'es' if world.size != 1 else ''}"
        )
    train_split, val_split = hold_out(split, t.val, t.seed)
    last = len(train_split) % t.batch_size
    if 0 < last < world.size:
        raise NormcliError(
            f"the last batch of every epoch holds {last} of {len(train_split)} training images, "
            f"fewer than the {world.size} processes; change batch_size, limit or val"
        )
    return train_split, val_split


def _settled(spec: RunSpec, device: torch.device, world: World) -> RunSpec:
    """`spec` with its precision and layout decided for this device (normcli.tuning): by rank 0,
    for every process of the run alike."""
    choice = choose(spec, device) if world.main else None
    if world.size > 1:
        choice = share_from_main(choice) or choose(spec, device, measure=False)
    return settle(spec, choice)


def _network(spec: RunSpec, device: torch.device, world: World) -> nn.Module:
    """The seeded network of `spec` (settled) on `device`, in its layout; then this process's
    own seed for dropout."""
    m, t = spec.model, spec.train
    torch.manual_seed(t.seed)  # weight init and dropout
    model = m.build()
    if t.sync_bn and world.size > 1:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if world.rank:  # the same weights everywhere, dropout masks of each process's own
        torch.manual_seed((t.seed + world.rank) % 2**63)
    return model


def _optimizer(
    model: nn.Module, t: TrainArgs, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """SGD (Nesterov) and its one-cycle schedule over `t.epochs` epochs of `steps` steps."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=t.lr,
        momentum=t.momentum,
        nesterov=t.momentum > 0,
        weight_decay=t.weight_decay,
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=t.lr,
        epochs=t.epochs,
        steps_per_epoch=steps,
        pct_start=_warmup_fraction(t.epochs * steps),
        div_factor=10.0,
        final_div_factor=100.0,
        cycle_momentum=False,
    )
    return optimizer, scheduler


def hold_out(split: Split, n: int, seed: int) -> tuple[Split, Split | None]:
    """(training, validation) splits: `n` images chosen by `seed` are held out; both keep the
    original order. n == 0 gives (split, None)."""
    if n == 0:
        return split, None
    if n >= len(split):
        raise NormcliError(f"val {n} leaves no training images (the split has {len(split)})")
    # A generator of its own: the held-out images depend on the seed alone, not on what the
    # run draws from its other generators.
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n].sort().values, order[n:].sort().values
    return split.select(train_idx), split.select(val_idx)


def checkpoint_meta(run: Run) -> CheckpointMeta:
    """The metadata describing the run as it is now, with its resume state."""
    dataset = run.dataset
    return CheckpointMeta(
        model_args=run.spec.model,
        train_args=run.spec.train,
        class_names=list(dataset.class_names),
        input_shape=list(dataset.input_shape),
        mean=list(dataset.mean),
        std=list(dataset.std),
        history=list(run.history),
        resume=ResumeState(epoch=run.epoch, steps_per_epoch=run.steps_per_epoch),
        machine=describe_machine(run.device),
        started=run.started,
    )


def save_run(run: Run, path: str | os.PathLike[str]) -> Path:
    """Write the run's checkpoint atomically: weights, metadata and what resuming needs.

    With several processes every one calls this: rank 0 writes (weights, momentum and data
    order are the same everywhere; each process's own RNG states are gathered), the others
    wait until it has."""
    params = list(run.model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    extra = {
        f"optim.{index[id(p)]}.{name}": value
        for p, buffers in run.optimizer.state.items()
        for name, value in buffers.items()
        if isinstance(value, torch.Tensor)
    }
    if run.ema is not None:  # the file's model is the average; resuming needs the live weights
        extra.update(live_tensors(run.model))
    extra.update(_rng_states())
    extra["rng.data"] = run.generator.get_state()
    if run.world.size > 1:  # every process's dropout stream: rng.torch.<rank>, rng.cuda.<rank>
        for rank, states in enumerate(gather_to_main(_rng_states())):
            if rank:
                extra.update({f"{key}.{rank}": value for key, value in states.items()})
    with interrupts_held():  # the file and the count of saved epochs change together
        if run.world.main:
            save_checkpoint(path, run.evaluated, checkpoint_meta(run), extra)
            run.saved_epochs = run.epoch
    barrier()
    run.saved_epochs = run.epoch  # every process: rank 0 has written it
    return Path(path)


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and the current GPU's when there is one)."""
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def restore_run(run: Run, ckpt: Checkpoint) -> None:
    """Continue `run` from a checkpoint of the same description: weights and buffers, momentum,
    RNG states and the history are loaded; the schedule is advanced to the saved step."""
    resume, where = ckpt.meta.resume, ckpt.path

    def bad(what: str) -> NormcliError:
        return NormcliError(f"{where}: resume state does not fit this run ({what})")

    if resume is None:
        raise NormcliError(f"{where}: holds no resume state")
    check_world_size(ckpt.meta, where, run.world.size)
    if ckpt.meta.run != run.spec:
        raise bad("its run description differs")
    epoch, steps = resume["epoch"], run.steps_per_epoch
    if epoch != len(ckpt.meta.history) or epoch > run.spec.train.epochs:
        raise bad(f"epoch {epoch} with {len(ckpt.meta.history)} history rows")
    if resume["steps_per_epoch"] != steps:
        raise bad(
            f"{resume['steps_per_epoch']} steps per epoch, this data gives {steps}; "
            "same data and limit as the first run?"
        )
    params = list(run.model.parameters())
    momentum = _momentum_buffers(ckpt, params, bad)
    if run.spec.train.momentum and epoch and len(momentum) != len(params):
        raise bad(f"{len(momentum)} momentum buffers for {len(params)} parameters")
    mine = f".{run.world.rank}" if run.world.rank else ""  # rank 0's are rng.torch, rng.cuda
    try:
        torch.set_rng_state(ckpt.extra[f"rng.torch{mine}"])
        run.generator.set_state(ckpt.extra["rng.data"].to("cpu"))
        if f"rng.cuda{mine}" in ckpt.extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.extra[f"rng.cuda{mine}"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NormcliError(f"{where}: resume state is unusable (RNG state: {reason})") from None
    _load_weights(run, ckpt, epoch * steps, bad)
    for i, buffer in momentum.items():
        run.optimizer.state[params[i]]["momentum_buffer"] = buffer.to(params[i].device).clone()
    _advance_schedule(run.scheduler, epoch * steps)
    run.history = list(ckpt.meta.history)
    run.started = ckpt.meta.started  # None from files that predate the field: unknown
    run.saved_epochs = epoch


def _load_weights(run: Run, ckpt: Checkpoint, steps: int, bad: Callable[[str], Exception]) -> None:
    """The checkpoint's weights into the run: its model, or with --ema its live weights into
    the trained network and its model into the average (of `steps` updates)."""
    if run.ema is None:
        run.model.load_state_dict(ckpt.model.state_dict())
    elif problem := restore_average(run.ema, run.model, ckpt.model.state_dict(), ckpt.extra,
                                    steps):  # fmt: skip
        raise bad(problem)


def check_world_size(meta: CheckpointMeta, where: object, processes: int) -> None:
    """Refuse to resume a run with another number of processes than it was trained by: the
    BatchNorm statistics, the per-process batch and the saved RNG states depend on it."""
    trained = meta.train_args.world_size
    if trained != processes:
        nproc = f" --nproc {trained}" if trained > 1 else ""
        raise NormcliError(
            f"{where}: trained by {trained} process{'es' if trained != 1 else ''}, not "
            f"{processes}; resume it with as many: normcli train --resume {where}{nproc}"
        )


def _momentum_buffers(
    ckpt: Checkpoint, params: list[nn.Parameter], bad: object
) -> dict[int, torch.Tensor]:
    """The stored SGD momentum buffers by parameter index, each checked against its parameter."""
    buffers = {}
    for key, value in ckpt.extra.items():
        if not key.startswith("optim."):
            continue
        _, index, name = (*key.split(".", 2), "", "")[:3]
        i = int(index) if index.isascii() and index.isdigit() else -1
        if name != "momentum_buffer" or not 0 <= i < len(params):
            raise bad(f"unexpected tensor {key!r}")  # type: ignore[operator]
        if value.shape != params[i].shape or value.dtype != params[i].dtype:
            raise bad(f"tensor {key!r} has shape {tuple(value.shape)}")  # type: ignore[operator]
        buffers[i] = value
    return buffers


def _advance_schedule(scheduler: torch.optim.lr_scheduler.OneCycleLR, steps: int) -> None:
    """Put the schedule (and the optimizer's learning rate) where `steps` steps leave it.
    OneCycleLR's rate is a closed form of the step number, so this equals stepping."""
    if steps == 0:
        return
    scheduler.last_epoch = steps - 1
    scheduler._step_count = steps  # noqa: SLF001 - only silences the step-order warning
    scheduler.step()
