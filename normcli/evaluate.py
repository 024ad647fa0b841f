"""Predictions and metrics: loss, accuracy, per-class accuracy, confusion, misclassified search."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from normcli.checkpoint import Checkpoint
from normcli.data import Dataset, Split, batches, get_dataset, load_split
from normcli.errors import NormcliError
from normcli.models import count_params

# Eval batch sizes 128 / 256 / 512 / 1000 on the 2-core CPU, test images per second:
# cifar_net 8.6k / 8.7k / 7.3k / 4.9k, mnist_net 29k / 30k / 34k / 21k (channels_last, BN
# folded). 256 is best or close for both.
EVAL_BATCH_SIZE = 256


@torch.inference_mode()
def predict(
    model: nn.Module,
    split: Split,
    spec: Dataset,
    batch_size: int = EVAL_BATCH_SIZE,
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits of `model` (put in eval mode) for every image of `split`, in order, on the CPU;
    `view` transforms each normalized batch first (test-time augmentation: normcli.tta)."""
    if batch_size <= 0:
        raise NormcliError(f"batch_size must be positive, got {batch_size}")
    model.eval()
    memory_format = _memory_format(model)
    model = fold_batchnorm(model)
    out = [
        model((view(x) if view else x).contiguous(memory_format=memory_format)).float()
        for x, _ in batches(split, spec, batch_size)
    ]
    if not out:
        return torch.empty(0, spec.num_classes)
    return torch.cat(out).cpu()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of an eval-mode `model` with every BatchNorm2d that directly follows a
    Conv2d in a Sequential folded into that conv's weight and bias; `model` itself when there
    is none. Same function up to float rounding, one pass over each activation fewer."""
    if model.training:  # batch statistics: nothing to fold
        return model
    pairs = []
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq.named_children())
            pairs += [
                (seq, name, prev)
                for (prev, a), (name, b) in zip(children, children[1:], strict=False)
                if type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d and b.track_running_stats
            ]
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    paths = {id(m): path for path, m in model.named_modules()}
    for seq, name, prev in pairs:
        target = folded.get_submodule(paths[id(seq)])
        conv = fuse_conv_bn_eval(target.get_submodule(prev), target.get_submodule(name))
        setattr(target, prev, conv)
        setattr(target, name, nn.Identity())
    return folded.to(memory_format=_memory_format(model))


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when a conv weight of the model is laid out so, else contiguous. (A conv
    with one input channel is both; the first one of mnist_net cannot tell.)"""
    for p in model.parameters():
        strict = p.ndim == 4 and not p.is_contiguous()
        if strict and p.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


@dataclass
class Metrics:
    """Test-set metrics computed from logits and labels."""

    loss: float
    accuracy: float  # percent
    correct: int
    total: int
    per_class_accuracy: list[float]  # percent, NaN-free: 0 for a class with no images
    confusion: list[list[int]]  # confusion[true][predicted]

    @property
    def wrong(self) -> int:
        return self.total - self.correct


def metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Metrics:
    """Loss (mean cross-entropy), accuracy, per-class accuracy and confusion matrix."""
    labels = labels.cpu()
    total = int(labels.numel())
    loss = float(F.cross_entropy(logits, labels, reduction="sum")) / max(total, 1)
    pred = logits.argmax(1)
    correct = int((pred == labels).sum())
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    per_class = confusion.diagonal() / confusion.sum(1).clamp(min=1) * 100
    return Metrics(
        loss=loss,
        accuracy=100.0 * correct / max(total, 1),
        correct=correct,
        total=total,
        per_class_accuracy=[float(v) for v in per_class],
        confusion=confusion.tolist(),
    )


def evaluate(
    model: nn.Module, split: Split, spec: Dataset, batch_size: int = EVAL_BATCH_SIZE
) -> Metrics:
    """Metrics of `model` on a whole split."""
    return metrics(predict(model, split, spec, batch_size), split.labels, spec.num_classes)


@dataclass
class Mistake:
    """One misclassified image."""

    index: int  # position in the test split
    true: int
    predicted: int
    probability: float  # softmax probability of the predicted class


def find_misclassified(
    logits: torch.Tensor, labels: torch.Tensor, n: int, sort: str = "index"
) -> list[Mistake]:
    """The first `n` misclassified images, or the `n` most confidently wrong (sort=confidence)."""
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    labels = labels.cpu()
    wrong = (pred != labels).nonzero().flatten()
    if sort == "confidence":
        wrong = wrong[conf[wrong].argsort(descending=True, stable=True)]
    wrong = wrong[:n]
    return [Mistake(int(i), int(labels[i]), int(pred[i]), float(conf[i])) for i in wrong.tolist()]


@dataclass
class CheckpointReport:
    """A checkpoint's description, history highlights and fresh evaluation."""

    name: str
    path: str
    model: str
    dataset: str
    norm: str
    groups: int | None
    ws: bool  # weight-standardized convolutions
    l1: float
    label: str  # names the processes and per-process batch of a data-parallel run
    world_size: int  # processes it was trained by
    batch_size: int  # global batch
    per_process_batch: int  # images each process normalized and trained on per step
    params: int
    epochs: int
    best_accuracy: float | None  # best test accuracy in the history, percent
    final_accuracy: float | None  # last epoch's test accuracy in the history
    seconds_per_epoch: float | None  # mean training seconds per epoch in the history
    metrics: Metrics
    tta: Metrics | None = None  # eval --tta: the test-time augmentation protocol's metrics
    tta_views: list[str] | None = None  # the views its logits are averaged over

    def to_dict(self) -> dict:
        doc = dataclasses.asdict(self)
        doc["metrics"]["wrong"] = self.metrics.wrong
        if self.tta is None:
            del doc["tta"], doc["tta_views"]
        else:
            doc["tta"]["wrong"] = self.tta.wrong
        return doc


def test_splits(
    ckpts: Sequence[Checkpoint],
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Split]:
    """The test split of every dataset the checkpoints use, each read once, on `device`."""
    datasets = dict.fromkeys(c.meta.dataset for c in ckpts)
    return {d: load_split(d, False, data_dir, limit=limit).to(device) for d in datasets}


def report(ckpt: Checkpoint, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> CheckpointReport:
    """Evaluate a loaded checkpoint on its dataset's test split and describe it."""
    meta, m = ckpt.meta, ckpt.meta.model_args
    spec = get_dataset(meta.dataset)
    result = evaluate(ckpt.model.to(split.images.device), split, spec, batch_size)
    accs = [row["test_accuracy"] for row in meta.history]
    secs = [row["seconds"] for row in meta.history if "seconds" in row]
    return CheckpointReport(
        name=ckpt.path.stem,
        path=str(ckpt.path),
        model=m.model,
        dataset=meta.dataset,
        norm=m.norm,
        groups=m.groups,
        ws=m.ws,
        l1=meta.train_args.l1,
        label=meta.label,
        world_size=meta.train_args.world_size,
        batch_size=meta.train_args.batch_size,
        per_process_batch=meta.train_args.per_process_batch,
        params=count_params(ckpt.model),
        epochs=len(meta.history),
        best_accuracy=max(accs) if accs else None,
        final_accuracy=accs[-1] if accs else None,
        seconds_per_epoch=sum(secs) / len(secs) if secs else None,
        metrics=result,
    )
