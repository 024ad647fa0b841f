"""Training: an epoch, its evaluation, and the loop that trains a run to its end (`train`).

    run = start_run(spec, data_dir=..., device="cpu")   # normcli.run: data, model, optimizer
    while not run.done:
        run_epoch(run)                                   # train + evaluate, one history row
        save_run(run, path)                              # normcli.run: atomic; resumable

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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from normcli.checkpoint import Checkpoint, EpochRecord, load_checkpoint
from normcli.config import RunSpec
from normcli.data import batches
from normcli.errors import NormcliError
from normcli.evaluate import Metrics, evaluate
from normcli.files import check_writable, exclusive_output
from normcli.models import count_params
from normcli.outputs import checkpoint_path
from normcli.parallel import (
    average_running_stats,
    process_group,
    run_size,
    share_from_main,
    sum_across,
    was_interrupted,
)
from normcli.run import Run, check_world_size, save_run, start_run
from normcli.runtime import INTERRUPTED, resolve_device, use_threads
from normcli.tuning import autocast


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of absolute values of all trainable parameters (the course's L1 term)."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad)


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
        # bf16: autocast around the forward pass and the loss (evaluation stays fp32).
        with autocast(t.precision, run.device):
            logits = net(x.contiguous(memory_format=run.memory_format))
            loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
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
        if run.ema is not None:
            run.ema.update_parameters(model)
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
    """Test-set metrics of the run's network as it is now (the weights' average with --ema)."""
    return evaluate(run.evaluated, run.test_split, run.dataset)


def run_epoch(run: Run, reporter: Reporter | None = None) -> EpochRecord:
    """Train one epoch, evaluate, and append the epoch's row to the history."""
    reporter = reporter or SilentReporter()
    reporter.start_epoch(run.epoch + 1, run.spec.train.epochs, run.steps_per_epoch)
    start = time.perf_counter()
    train_loss, train_acc = train_epoch(run, reporter)
    seconds = time.perf_counter() - start
    average_running_stats(run.model)  # one set of BatchNorm statistics for every process
    if run.ema is not None:
        average_running_stats(run.ema.module)
    row = _evaluated_row(run, train_loss, train_acc, seconds) if run.world.main else None
    run.history.append(share_from_main(row))  # evaluated once, by rank 0
    return run.history[-1]


def _evaluated_row(run: Run, train_loss: float, train_acc: float, seconds: float) -> EpochRecord:
    """The epoch's history row: its training numbers and a fresh evaluation."""
    test = evaluate_run(run)
    if run.val_split is not None:
        val = evaluate(run.evaluated, run.val_split, run.dataset)
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


@dataclass
class TrainResult:
    path: Path
    history: list[EpochRecord]
    params: int


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

    `out`: the checkpoint's path, or a folder for the default name (see
    normcli.outputs.checkpoint_path). A folder is created after the data has loaded; the
    file is claimed against other normcli processes while the run writes it."""
    spec = spec.resolve()
    dev = resolve_device(device)
    path = checkpoint_path(spec.default_path(), out, overwrite, resume_from is not None)
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
            claim = _claim(path, replace=overwrite or resume_from is not None)
            with claim if world.main else contextlib.nullcontext():
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


@contextlib.contextmanager
def _claim(path: Path, replace: bool) -> Iterator[None]:
    """Hold `path` against other normcli processes while the run writes it. Checked again
    under the claim: another run may have written it since the first check, and finished."""
    with exclusive_output(path):
        if not replace and path.exists():
            raise NormcliError(
                f"{path} was written by another run meanwhile; pass --overwrite to replace it, "
                "or --out elsewhere"
            )
        yield


def _interrupted(
    path: Path,
    saved: int,
    epochs: int,
    data_dir: str | os.PathLike[str] | None,
    processes: int = 1,
) -> NormcliError:
    if saved == 0:
        return NormcliError("interrupted during epoch 1; nothing was saved", exit_code=INTERRUPTED)
    data = f" --data-dir {data_dir}" if data_dir is not None else ""
    nproc = f" --nproc {processes}" if processes > 1 else ""
    done = f"epoch 1 of {epochs} is" if saved == 1 else f"epochs 1-{saved} of {epochs} are"
    return NormcliError(
        f"interrupted; {done} saved in {path}; "
        f"resume with: normcli train --resume {path}{data}{nproc}",
        exit_code=INTERRUPTED,
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
