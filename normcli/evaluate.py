"""Predictions and metrics: loss, accuracy, per-class accuracy, confusion, misclassified search."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normcli.data import DatasetSpec, Split, batches

EVAL_BATCH_SIZE = 1000


@torch.inference_mode()
def predict(
    model: nn.Module, split: Split, spec: DatasetSpec, batch_size: int = EVAL_BATCH_SIZE
) -> torch.Tensor:
    """Logits of `model` (put in eval mode) for every image of `split`, in order, on the CPU."""
    model.eval()
    memory_format = _memory_format(model)
    out = [
        model(x.contiguous(memory_format=memory_format)).float()
        for x, _ in batches(split, spec, batch_size)
    ]
    if not out:
        return torch.empty(0, spec.num_classes)
    return torch.cat(out).cpu()


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's first conv weight uses it, else contiguous."""
    for p in model.parameters():
        if p.ndim == 4:
            if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
                return torch.channels_last
            break
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
    model: nn.Module, split: Split, spec: DatasetSpec, batch_size: int = EVAL_BATCH_SIZE
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
    """The first `n` misclassified images, or the `n` most confidently wrong (`sort='confidence'`)."""
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    labels = labels.cpu()
    wrong = (pred != labels).nonzero().flatten()
    if sort == "confidence":
        wrong = wrong[conf[wrong].argsort(descending=True, stable=True)]
    wrong = wrong[:n]
    return [
        Mistake(int(i), int(labels[i]), int(pred[i]), float(conf[i])) for i in wrong.tolist()
    ]
