"""Training: the public seam (start a run, train an epoch, evaluate, save) and the loop on it.

    run = start_run(spec, data_dir=..., device="cpu")   # data, model, optimizer, schedule
    while not run.done:
        run_epoch(run)                                   # train + evaluate, one history row
        save_run(run, path)                              # atomic; resumable

The checkpoint written after every epoch holds what cannot be derived from the run
description: weights and buffers, momentum buffers and RNG states. Resuming rebuilds
everything else (the one-cycle schedule from the config and the epoch count), so an
interrupted run continues to exactly the weights an uninterrupted run would reach (on
the CPU, same seed and thread count).

Several processes (TrainArgs.world_size > 1, started by a launcher: see normcli.parallel)
run the same loop, each on its share of every batch: the batch size is the global batch.
Every process draws the same order and augmentation and keeps its rows of each batch
(data.batches' shard), so W processes see exactly the images, augmented alike, that one
process sees at the same batch size. DDP averages the gradients of the processes' mean losses:
the gradient of the mean over the whole batch. The L1 term is added on every process and
the average of W equal gradients is that gradient, so it counts once; weight decay is SGD's,
applied to the (identical) weights of every process, once. GN, LN and no norm thus train to
the weights of one process (up to float rounding). BatchNorm normalizes over each process's
share (ghost batches of B/W), or over the whole batch with sync_bn; running statistics are
averaged over the processes before every evaluation and save. Rank 0 evaluates, saves and
reports; the checkpoint is an ordinary one-process model, resumable by as many processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from normcli.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    EpochRecord,
    ResumeState,
    check_writable,
    exclusive_output,
    load_checkpoint,
    save_checkpoint,
)
from normcli.config import RunSpec
from normcli.data import Augment, Dataset, Split, batches, get_dataset, load_split
from normcli.entry import STOP_SIGNALS
from normcli.errors import NormcliError
from normcli.evaluate import Metrics, evaluate
from normcli.models import count_params
from normcli.parallel import (
    World,
    average_running_stats,
    barrier,
    convert_sync_batchnorm,
    current_world,
    gather_to_main,
    local_main_first,
    process_group,
    run_size,
    share_from_main,
    sum_across,
    was_interrupted,
    wrap_ddp,
)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of absolute values of all trainable parameters (the course's L1 term)."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NormcliError("device cuda: no CUDA GPU is available here; use cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise NormcliError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


class Reporter(Protocol):
    """Receives progress; the CLI shows it as a rich progress bar on stderr."""

    def start_epoch(self, epoch: int, epochs: int, num_batches: int) -> None: ...

    def batch(self, done: int, loss: float, accuracy: float, images_per_s: float) -> None: ...

    def end_epoch(self, row: EpochRecord) -> None: ...


class SilentReporter:
    """A Reporter that shows nothing (library use, benchmarks)."""

    def start_epoch(self, epoch: int, epochs: int, num_batches: int) -> None:
        pass

    def batch(self, done: int, loss: float, accuracy: float, images_per_s: float) -> None:
        pass

    def end_epoch(self, row: EpochRecord) -> None:
        pass


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
        _restore(run, resume_from)
    return run


def new_run(
    spec: RunSpec,
    train_split: Split,
    test_split: Split,
    device: torch.device,
    world: World | None = None,
) -> Run:
    """A fresh run of `spec` (resolved) on splits already in memory: holds out the validation
    images, moves the data to `device`, seeds and builds the network, optimizer and schedule.
    With several processes (`world`, default: the initialized process group's) every one
    calls this: BatchNorm is synchronized when the spec says so and DDP wraps the network."""
    m, t = spec.model, spec.train
    world = world or current_world()
    if t.world_size != world.size:
        raise NormcliError(
            f"world_size {t.world_size}: this run has {world.size} "
            f"process{'es' if world.size != 1 else ''}"
        )
    dataset = get_dataset(m.dataset)
    train_split, val_split = hold_out(train_split, t.val, t.seed)
    last = len(train_split) % t.batch_size
    if 0 < last < world.size:
        raise NormcliError(
            f"the last batch of every epoch holds {last} of {len(train_split)} training images, "
            f"fewer than the {world.size} processes; change batch_size, limit or val"
        )
    torch.manual_seed(t.seed)  # weight init and dropout
    model = m.build()
    if t.sync_bn and world.size > 1:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if world.rank:  # the same weights everywhere, dropout masks of each process's own
        torch.manual_seed((t.seed + world.rank) % 2**63)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=t.lr,
        momentum=t.momentum,
        nesterov=t.momentum > 0,
        weight_decay=t.weight_decay,
        foreach=True,
    )
    steps = -(-len(train_split) // t.batch_size)
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
        ddp=wrap_ddp(model, device) if world.size > 1 else None,
    )


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


def train_epoch(run: Run, reporter: Reporter | None = None) -> tuple[float, float]:
    """One pass over the training split; returns (mean loss, accuracy %).

    Stops with NormcliError (exit 1) at the first progress check where the loss is not finite:
    the weights are lost by then, and the last checkpoint keeps the last good epoch."""
    reporter = reporter or SilentReporter()
    t = run.spec.train
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    net = run.ddp or model  # what the batches go through: DDP with several processes
    world = run.world
    model.train()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    seen = 0
    totals = (0.0, 0, 0)
    start = time.perf_counter()
    num_batches = run.steps_per_epoch
    stream = batches(
        run.train_split, run.dataset, t.batch_size,
        shuffle=True, augment=run.augment, generator=run.generator,
        shard=(world.rank, world.size) if world.size > 1 else None,
    )  # fmt: skip
    for i, (x, y) in enumerate(stream):
        logits = net(x.contiguous(memory_format=run.memory_format))
        loss = F.cross_entropy(logits, y)
        objective = loss
        if world.size > 1:
            # DDP averages the processes' gradients; weighting each mean loss by the share of
            # the batch it covers makes that the gradient of the mean over the whole batch.
            # The weight is 1 unless the epoch's last batch splits unevenly.
            batch = min(t.batch_size, len(run.train_split) - i * t.batch_size)
            share = y.shape[0] * world.size / batch
            objective = loss * share if share != 1 else loss
        if t.l1:  # on every process: DDP's average of W equal L1 gradients is one of them
            objective = objective + t.l1 * l1_penalty(model)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: no host sync per step.
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if i % 20 == 19 or i == num_batches - 1:
            totals = _totals(run, loss_sum, correct, seen)
            mean_loss = totals[0] / totals[2]
            _check_finite(run, mean_loss)
            elapsed = time.perf_counter() - start
            reporter.batch(i + 1, mean_loss, 100.0 * totals[1] / totals[2], totals[2] / elapsed)
    return totals[0] / max(totals[2], 1), 100.0 * totals[1] / max(totals[2], 1)


def _totals(
    run: Run, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int
) -> tuple[float, int, int]:
    """(summed loss, correct, images) of the epoch so far, over every process of the run."""
    if run.world.size == 1:
        return loss_sum.item(), int(correct.item()), seen
    packed = torch.stack([loss_sum.double(), correct.double(), loss_sum.new_tensor(seen).double()])
    loss, right, images = sum_across(packed).tolist()
    return loss, round(right), round(images)


def _check_finite(run: Run, loss: float) -> None:
    if not math.isfinite(loss):
        kept = f"epochs 1-{run.epoch} are kept" if run.epoch else "nothing was saved"
        raise NormcliError(
            f"training diverged in epoch {run.epoch + 1} (loss {loss}); {kept}; "
            f"try a lower learning rate than {run.spec.train.lr:g}",
            exit_code=1,
        )


def evaluate_run(run: Run) -> Metrics:
    """Test-set metrics of the run's network as it is now."""
    return evaluate(run.model, run.test_split, run.dataset)


def run_epoch(run: Run, reporter: Reporter | None = None) -> EpochRecord:
    """Train one epoch, evaluate, and append the epoch's row to the history."""
    reporter = reporter or SilentReporter()
    reporter.start_epoch(run.epoch + 1, run.spec.train.epochs, run.steps_per_epoch)
    start = time.perf_counter()
    train_loss, train_acc = train_epoch(run, reporter)
    seconds = time.perf_counter() - start
    average_running_stats(run.model)  # one set of BatchNorm statistics for every process
    row = _evaluated_row(run, train_loss, train_acc, seconds) if run.world.main else None
    run.history.append(share_from_main(row))  # evaluated once, by rank 0
    return run.history[-1]


def _evaluated_row(run: Run, train_loss: float, train_acc: float, seconds: float) -> EpochRecord:
    """The epoch's history row: its training numbers and a fresh evaluation."""
    test = evaluate_run(run)
    if run.val_split is not None:
        val = evaluate(run.model, run.val_split, run.dataset)
    row = EpochRecord(
        epoch=run.epoch + 1,
        train_loss=train_loss,
        train_accuracy=train_acc,
        test_loss=test.loss,
        test_accuracy=test.accuracy,
        lr=run.scheduler.get_last_lr()[0],
        seconds=seconds,
        images_per_second=len(run.train_split) / seconds,
    )
    if run.val_split is not None:
        row["val_loss"], row["val_accuracy"] = val.loss, val.accuracy
    return row


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
    extra.update(_rng_states())
    extra["rng.data"] = run.generator.get_state()
    if run.world.size > 1:  # every process's dropout stream: rng.torch.<rank>, rng.cuda.<rank>
        for rank, states in enumerate(gather_to_main(_rng_states())):
            if rank:
                extra.update({f"{key}.{rank}": value for key, value in states.items()})
    with _interrupts_held():  # the file and the count of saved epochs change together
        if run.world.main:
            save_checkpoint(path, run.model, checkpoint_meta(run), extra)
            run.saved_epochs = run.epoch
    barrier()
    run.saved_epochs = run.epoch  # every process: rank 0 has written it
    return Path(path)


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers that
    were installed. Without it Ctrl-C landing between the checkpoint's rename and the
    bookkeeping after it reports the epoch as unsaved while the file holds it. Written by
    hand: neither the standard library nor torch offers it, and blocking the signals with
    pthread_sigmask would not do (the kernel hands them to another thread, such as
    OpenMP's, and Python still runs the handler in the main thread)."""
    installed = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in installed.values():
        yield  # handlers can only be swapped in the main thread, and restored if Python's
        return
    caught: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in installed.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and the current GPU's when there is one)."""
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def _restore(run: Run, ckpt: Checkpoint) -> None:
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
    run.model.load_state_dict(ckpt.model.state_dict())
    for i, buffer in momentum.items():
        run.optimizer.state[params[i]]["momentum_buffer"] = buffer.to(params[i].device).clone()
    _advance_schedule(run.scheduler, epoch * steps)
    run.history = list(ckpt.meta.history)
    run.saved_epochs = epoch


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


@dataclass
class TrainResult:
    path: Path
    history: list[EpochRecord]
    params: int


@contextmanager
def use_threads(count: int | None) -> Iterator[None]:
    """Run with `count` intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    spec: RunSpec,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    resume_from: Checkpoint | None = None,
) -> TrainResult:
    """Train a model as `spec` says and write its checkpoint after every epoch.

    `out` is the checkpoint's path, or a folder (one that exists, or a path ending in '/') for
    the default file name; by default checkpoints/<run>.safetensors. A folder is created
    after the data has loaded; the file is claimed against other normcli processes while
    the run writes it."""
    spec = spec.resolve()
    dev = resolve_device(device)
    path = output_path(spec, out, overwrite, resuming=resume_from is not None)
    reporter = reporter or SilentReporter()
    run = None
    t = spec.train
    try:
        with use_threads(t.threads), process_group(t.world_size, dev) as (world, dev):
            if not world.main:
                reporter = SilentReporter()  # one progress display: rank 0's
            run = start_run(spec, data_dir=data_dir, device=dev, resume_from=resume_from,
                            world=world)  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            check_writable(path)
            # Rank 0 alone writes: it claims the file against other normcli processes.
            with exclusive_output(path) if world.main else contextlib.nullcontext():
                while not run.done:
                    row = run_epoch(run, reporter)
                    save_run(run, path)  # atomic: the epoch is in, or not
                    reporter.end_epoch(row)
    except (KeyboardInterrupt, Exception) as e:
        # A worker asked to stop may fail first in a collective its partner already left.
        if not isinstance(e, KeyboardInterrupt) and not was_interrupted():
            raise
        # Epochs in the file: a run stopped before it was built has only what it resumed.
        saved = run.saved_epochs if run else len(resume_from.meta.history) if resume_from else 0
        raise _interrupted(path, saved, t.epochs, data_dir, t.world_size) from None
    return TrainResult(path, run.history, count_params(run.model))


def output_path(
    spec: RunSpec,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resuming: bool = False,
) -> Path:
    """Where `train` writes the checkpoint of `spec` (resolved), checked before any work:
    `out`, or the default name inside folder `out` (an existing folder or a path ending in
    '/'), or checkpoints/<run>.safetensors. An existing folder must be writable (a missing
    one is made after the data loads), and a file there is replaced only with `overwrite`
    (or continued, when `resuming`)."""
    if out is None:
        path = spec.default_path()
    elif str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        path = Path(out) / spec.default_path().name
    else:
        path = Path(out)
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == Path())
    if existing.exists() and not existing.is_dir():
        raise NormcliError(f"{path}: {existing} is not a folder")
    if path.parent.is_dir():
        check_writable(path)
    if not resuming and path.exists() and not overwrite:
        raise NormcliError(f"{path} exists; pass --overwrite to replace it, or --out elsewhere")
    return path


def _interrupted(
    path: Path,
    saved: int,
    epochs: int,
    data_dir: str | os.PathLike[str] | None,
    processes: int = 1,
) -> NormcliError:
    if saved == 0:
        return NormcliError("interrupted during epoch 1; nothing was saved", exit_code=130)
    data = f" --data-dir {data_dir}" if data_dir is not None else ""
    nproc = f" --nproc {processes}" if processes > 1 else ""
    done = f"epoch 1 of {epochs} is" if saved == 1 else f"epochs 1-{saved} of {epochs} are"
    return NormcliError(
        f"interrupted; {done} saved in {path}; "
        f"resume with: normcli train --resume {path}{data}{nproc}",
        exit_code=130,
    )


def resume_training(
    path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> TrainResult:
    """Continue the run saved in `path` to its configured epoch count, in place, with as many
    processes as it was trained by (this one alone, or those its launcher started)."""
    ckpt = load_checkpoint(path)
    check_world_size(ckpt.meta, ckpt.path, run_size())
    try:
        spec = ckpt.meta.run.resolve()
    except NormcliError as e:
        raise NormcliError(f"{ckpt.path}: training config is invalid ({e})") from None
    return train(
        spec, data_dir=data_dir, device=device, out=path, reporter=reporter, resume_from=ckpt
    )
