"""Throughput: normcli's in-memory, batch-augmented pipeline vs the usual course pipeline.

    python bench/throughput.py --dataset mnist --dataset cifar10 \\
        --json bench/results/throughput.json --markdown bench/results/throughput.md

One process runs the two pipelines alternately, A B A B ..., for --rounds rounds:

A  normcli: the whole split in memory as uint8; shuffled batches sliced from it and augmented
   as whole batches (normcli.data.batches with the dataset's augmentation); the library's
   own training step (normcli.train.new_run and train_epoch, channels_last as RunSpec sets it);
   evaluation with normcli.evaluate.evaluate (inference_mode, channels_last, batches of
   EVAL_BATCH_SIZE, BatchNorm folded into the convolutions by fold_batchnorm).
B  the usual course pipeline: a torchvision dataset returning one PIL image per item,
   per-sample PIL transforms equivalent to A's augmentation, ToTensor, Normalize, and
   DataLoader(batch_size, shuffle=True, num_workers=2, persistent_workers=False); the same
   model with the same initial weights, the same SGD + one-cycle optimizer, the same batch
   size, the plain contiguous memory format. Evaluation: a DataLoader over the test set
   (ToTensor + Normalize, 2 workers) with the training batch size, as the course builds its
   test loader from the same arguments as its training loader, under torch.no_grad.
   B's main process keeps torch's default thread count, as the course does; on 2 cores its
   threads then compete with the 2 busy workers. --reference-threads 1 measures the
   reference with that contention taken out. A runs on torch's default thread count too
   (as `normcli train` does); --threads N runs it on N. Both run under normcli's OpenMP wait
   policy (GOMP_SPINCOUNT=1000, normcli.entry.configure_threads) unless the environment sets
   OMP_WAIT_POLICY or GOMP_SPINCOUNT (GOMP_SPINCOUNT=300000: libgomp's default, a notebook's);
   the report names the policy.

Timed, per round and pipeline:
- training: one epoch of --images images (default: the whole training split), from the first
  batch request to the last optimizer step. For B that includes starting and stopping the 2
  DataLoader workers: with persistent_workers=False, as the course runs it, every epoch pays
  for them, so they are counted. B's wait for its first batch (worker start-up plus one batch)
  is reported on its own so the reader can take it out.
- evaluation: one pass over the test split (or its first --eval-images), B's worker start-up
  included for the same reason.
Not timed: reading the files into memory (once per run in both pipelines), building the model
and optimizer, and one warm-up of a few batches of each pipeline before the first round
(one-time costs: oneDNN kernel selection, page faults, lazy imports).

The ratio A/B is taken per round (A and B ran next to each other, so slow drifts of the
machine cancel) and its median reported. Targets (batch size 128, default models):
training >= 2.0x on MNIST, >= 1.5x on CIFAR-10; evaluation >= 3x on both.

--quick writes a tiny random dataset in the official layouts to a temporary folder and runs
one round of two steps, without warm-up or targets: a smoke test of the code paths, not a
measurement.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from normcli.entry import configure_threads

# normcli's OpenMP wait policy for both pipelines (the caller's environment wins); before
# torch loads, as OpenMP reads it then: hence the imports below it.
# ruff: noqa: E402
configure_threads()

import torch
import torch.nn.functional as F
import torchvision
import typer
from machine import (  # bench/machine.py: a script's folder is on sys.path
    checkout_env,
    command_block,
    machine_info,
    openmp_policy,
    smoke_banner,
    write_text,
)
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset
from torch.utils.data import Dataset as TorchDataset
from torchvision import transforms as T

from normcli.config import RunSpec
from normcli.data import (
    DATA_ENV,
    DATASETS,
    Dataset,
    Split,
    get_dataset,
    load_split,
    write_synthetic,
)
from normcli.errors import NormcliError
from normcli.evaluate import EVAL_BATCH_SIZE, evaluate
from normcli.norms import NORMS
from normcli.train import new_run, train_epoch, use_threads

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"  # ../shared/data from the repository root
REFERENCE_WORKERS = 2  # the course's DataLoader num_workers
MIN_ROUNDS = 3
WARMUP_BATCHES = 3  # per pipeline, before the first round, not timed
LIBGOMP_SPIN = "300000"  # libgomp's default GOMP_SPINCOUNT: what a notebook's torch runs with
QUICK_TRAIN, QUICK_TEST = 256, 128  # --quick: images per generated split
CPU = torch.device("cpu")

# Minimum median ratio A/B, per (dataset, phase), on the 2-core machine at batch size 128.
TARGETS: dict[tuple[str, str], float] = {
    ("mnist", "train"): 2.5,
    ("cifar10", "train"): 1.5,
    ("mnist", "eval"): 3.0,
    ("cifar10", "eval"): 3.0,
}

console = Console(stderr=True)


# ---------------------------------------------------------------------------
# B: the reference pipeline, as the course writes it
# ---------------------------------------------------------------------------


def reference_transform(spec: Dataset, train: bool) -> T.Compose:
    """Per-sample PIL transforms doing what the dataset's augmentation does to whole batches.

    Same ranges; torchvision's RandomAffine defaults (nearest-neighbour, whole-pixel shifts)
    where normcli resamples bilinearly with sub-pixel shifts, as a course would write it.
    """
    tail = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if not train:
        return T.Compose(tail)
    augment = spec.augment
    _, h, w = spec.input_shape
    head: list[nn.Module] = []
    if augment.degrees or augment.shift:  # rotation U(-deg, deg), shift U(-px, px)
        shift = (augment.shift / w, augment.shift / h)  # torchvision: fractions of the size
        head.append(T.RandomAffine(augment.degrees, translate=shift))
    if augment.crop_padding:
        head.append(T.RandomCrop((h, w), padding=augment.crop_padding))
    if augment.flip:
        head.append(T.RandomHorizontalFlip())
    return T.Compose(head + tail)


class CifarBinary(TorchDataset):
    """CIFAR-10 served the way torchvision.datasets.CIFAR10 serves it: a PIL image per item.

    torchvision reads only the python batches; the local copy is the binary layout, so the
    decoded uint8 images are held here as one (N, 32, 32, 3) array, as torchvision holds them.
    """

    def __init__(self, root: Path, train: bool, transform: T.Compose) -> None:
        split = load_split("cifar10", train, root, download_missing=False)
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def reference_dataset(spec: Dataset, root: Path, train: bool) -> TorchDataset:
    """The course's dataset object for `spec`: torchvision's MNIST, or CifarBinary."""
    transform = reference_transform(spec, train)
    if spec.name == "mnist":
        return torchvision.datasets.MNIST(str(root), train=train, transform=transform)
    return CifarBinary(root, train, transform)


# ---------------------------------------------------------------------------
# One timed run of each pipeline
# ---------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything both pipelines need for one dataset, loaded once (B's datasets on first use:
    when B runs in its own process, only that process reads them)."""

    run: RunSpec  # resolved; B uses it with channels_last=False
    spec: Dataset
    data_dir: Path
    train_split: Split  # A, in memory (B's schedule is built from it too)
    test_split: Split
    train_images: int  # per round
    reference_eval_batch_size: int
    workers: int
    reference_threads: int | None  # torch threads of B's main process; None: torch's default
    threads: int | None = None  # torch threads of A; None: torch's default

    @functools.cached_property
    def reference_train(self) -> TorchDataset:
        return reference_dataset(self.spec, self.data_dir, train=True)

    @functools.cached_property
    def reference_test(self) -> TorchDataset:
        return reference_dataset(self.spec, self.data_dir, train=False)


@dataclass
class Timing:
    images: int
    seconds: float
    first_batch_seconds: float | None = None  # B only: worker start-up + first batch

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def normcli_train(bench: Bench, images: int) -> tuple[Timing, nn.Module]:
    """A: one epoch of `images` images through normcli's own training step."""
    split = bench.train_split.head(images)
    run = new_run(bench.run, split, bench.test_split.head(1), CPU)
    gc.collect()
    with use_threads(bench.threads):
        start = time.perf_counter()
        train_epoch(run)
        return Timing(len(split), time.perf_counter() - start), run.model


def normcli_eval(bench: Bench, model: nn.Module, images: int) -> Timing:
    """A: normcli.evaluate.evaluate over the first `images` test images."""
    split = bench.test_split.head(images)
    gc.collect()
    with use_threads(bench.threads):
        start = time.perf_counter()
        evaluate(model, split, bench.spec, EVAL_BATCH_SIZE)
        return Timing(len(split), time.perf_counter() - start)


def reference_train(bench: Bench, images: int) -> tuple[Timing, nn.Module]:
    """B: one epoch of `images` images through a DataLoader with per-sample PIL transforms."""
    spec = bench.run
    config = dataclasses.replace(spec.train, channels_last=False)
    dataset = bench.reference_train
    # RandomSampler is what shuffle=True builds; num_samples makes the epoch `images` long
    # so no prefetched batch is wasted when it is shorter than the dataset.
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=RandomSampler(dataset, num_samples=images),
        num_workers=bench.workers,
        persistent_workers=False,
    )
    # Same init, optimizer and schedule as A (an epoch of `images` images).
    state = new_run(RunSpec(spec.model, config), bench.train_split.head(images),
                    bench.test_split.head(1), CPU)  # fmt: skip
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    model.train()
    loss_sum, correct, seen, first = 0.0, 0, 0, None
    gc.collect()
    with use_threads(bench.reference_threads):
        start = time.perf_counter()
        for x, y in loader:  # exhausting the loader also stops its workers: counted
            if first is None:
                first = time.perf_counter() - start
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * y.shape[0]  # the course logs loss and accuracy every step
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        seconds = time.perf_counter() - start
    return Timing(seen, seconds, first), model


def reference_eval(bench: Bench, model: nn.Module, images: int) -> Timing:
    """B: the course's test loop over the first `images` test images."""
    dataset = bench.reference_test
    if images < len(dataset):
        dataset = Subset(dataset, range(images))
    loader = DataLoader(
        dataset,
        batch_size=bench.reference_eval_batch_size,
        shuffle=False,
        num_workers=bench.workers,
        persistent_workers=False,
    )
    model.eval()
    loss_sum, correct, seen, first = 0.0, 0, 0, None
    gc.collect()
    with use_threads(bench.reference_threads), torch.no_grad():
        start = time.perf_counter()
        for x, y in loader:
            if first is None:
                first = time.perf_counter() - start
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        seconds = time.perf_counter() - start
    return Timing(seen, seconds, first)


class InProcessReference:
    """B in this process (under this process's OpenMP policy)."""

    def __init__(self, bench: Bench) -> None:
        self.bench, self.model = bench, None

    def train(self, images: int) -> Timing:
        timing, self.model = reference_train(self.bench, images)
        return timing

    def eval(self, images: int) -> Timing:
        return reference_eval(self.bench, self.model, images)

    def close(self) -> None:
        pass


class ReferenceProcess:
    """B in a process of its own under its own OpenMP spin count (a notebook runs under
    libgomp's default), driven phase by phase so that A and B still alternate. Its bench is
    built there from the same options; it times each phase itself and answers one JSON line."""

    def __init__(self, options: dict[str, Any], spin: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env["GOMP_SPINCOUNT"] = spin
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--reference-worker", json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=checkout_env(env),
        )  # fmt: skip

    def _call(self, phase: str, images: int) -> Timing:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{phase} {images}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise NormcliError(f"the reference process ended (exit {self.proc.wait()})")
        return Timing(**json.loads(answer))

    def train(self, images: int) -> Timing:
        return self._call("train", images)

    def eval(self, images: int) -> Timing:
        return self._call("eval", images)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def reference_worker_loop(options: dict[str, Any]) -> None:
    """The other end of ReferenceProcess: read 'train N' / 'eval N' lines, answer each with
    the phase's Timing as one JSON line."""
    config = RunSpec.from_options(**options.pop("run")).resolve()
    bench, _ = load_bench(config, Path(options.pop("root")), **options)
    reference = InProcessReference(bench)
    for line in sys.stdin:
        phase, images = line.split()
        timing = reference.train(int(images)) if phase == "train" else reference.eval(int(images))
        print(json.dumps(dataclasses.asdict(timing)), flush=True)


# ---------------------------------------------------------------------------
# Rounds, summaries
# ---------------------------------------------------------------------------


def load_bench(
    run: RunSpec,
    data_dir: Path,
    *,
    images: int | None,
    eval_images: int | None,
    reference_eval_batch_size: int | None,
    workers: int,
    reference_threads: int | None,
    threads: int | None = None,
) -> tuple[Bench, int]:
    """Read both pipelines' data once; returns the bench and the evaluation image count."""
    spec = get_dataset(run.model.dataset)
    train_split = load_split(spec.name, True, data_dir, download_missing=False)
    test_split = load_split(spec.name, False, data_dir, download_missing=False)
    for option, value, size in (
        ("--images", images, len(train_split)),
        ("--eval-images", eval_images, len(test_split)),
    ):
        if value is not None and not 0 < value <= size:
            raise NormcliError(f"{option} must be 1 to {size} for {spec.name}, got {value}")
    bench = Bench(
        run=run,
        spec=spec,
        data_dir=data_dir,
        train_split=train_split,
        test_split=test_split,
        train_images=images or len(train_split),
        reference_eval_batch_size=reference_eval_batch_size or run.train.batch_size,
        workers=workers,
        reference_threads=reference_threads,
        threads=threads,
    )
    return bench, eval_images or len(test_split)


def warm_up(bench: Bench, reference: InProcessReference | ReferenceProcess) -> None:
    """A few batches of each pipeline: one-time costs stay out of the timed rounds."""
    n = min(WARMUP_BATCHES * bench.run.train.batch_size, len(bench.train_split))
    _, model = normcli_train(bench, n)
    normcli_eval(bench, model, min(EVAL_BATCH_SIZE, len(bench.test_split)))
    reference.train(n)
    reference.eval(min(n, len(bench.test_split)))


def summarize(a: list[Timing], b: list[Timing], target: float | None) -> dict[str, Any]:
    """Per-round img/s of both pipelines, per-round ratios, medians, and the target check."""
    a_rate = [t.images_per_second for t in a]
    b_rate = [t.images_per_second for t in b]
    ratios = [x / y for x, y in zip(a_rate, b_rate, strict=True)]
    median_ratio = statistics.median(ratios)
    return {
        "images": a[0].images,
        "normcli_images_per_s": statistics.median(a_rate),
        "reference_images_per_s": statistics.median(b_rate),
        "ratio": median_ratio,
        "target": target,
        "meets_target": None if target is None else median_ratio >= target,
        "rounds": {
            "normcli_images_per_s": a_rate,
            "reference_images_per_s": b_rate,
            "ratio": ratios,
            "normcli_seconds": [t.seconds for t in a],
            "reference_seconds": [t.seconds for t in b],
            "reference_first_batch_s": [t.first_batch_seconds for t in b],
        },
    }


def measure(
    bench: Bench,
    eval_images: int,
    rounds: int,
    quick: bool,
    reference: InProcessReference | ReferenceProcess,
) -> dict[str, Any]:
    """Warm up, then `rounds` rounds of A, B (training), A, B (evaluation); the summary.
    B runs in `reference`: this process, or one of its own."""
    m, config = bench.run.model, bench.run.train
    if not quick:  # a smoke run is all warm-up
        warm_up(bench, reference)
    timings: dict[str, list[Timing]] = {k: [] for k in ("a_train", "b_train", "a_eval", "b_eval")}
    for r in range(rounds):
        a_train, model_a = normcli_train(bench, bench.train_images)
        b_train = reference.train(bench.train_images)
        a_eval = normcli_eval(bench, model_a, eval_images)
        b_eval = reference.eval(eval_images)
        for key, t in zip(timings, (a_train, b_train, a_eval, b_eval), strict=True):
            timings[key].append(t)
        console.print(
            f"{m.dataset} round {r + 1}/{rounds}: train {a_train.images_per_second:,.0f} vs "
            f"{b_train.images_per_second:,.0f} img/s, eval {a_eval.images_per_second:,.0f} vs "
            f"{b_eval.images_per_second:,.0f} img/s",
            highlight=False,
        )
    return {
        "dataset": m.dataset,
        "model": m.model,
        "norm": m.norm,
        "groups": m.groups,
        "batch_size": config.batch_size,
        "channels_last": config.channels_last,
        "normcli_eval_batch_size": EVAL_BATCH_SIZE,
        "reference_eval_batch_size": bench.reference_eval_batch_size,
        "reference_workers": bench.workers,
        "reference_threads": bench.reference_threads or torch.get_num_threads(),
        "rounds": rounds,
        "train": summarize(
            timings["a_train"],
            timings["b_train"],
            None if quick else TARGETS.get((m.dataset, "train")),
        ),
        "eval": summarize(
            timings["a_eval"],
            timings["b_eval"],
            None if quick else TARGETS.get((m.dataset, "eval")),
        ),
    }


# ---------------------------------------------------------------------------
# Output: terminal table, JSON, Markdown
# ---------------------------------------------------------------------------

_PHASES = (("train", "training"), ("eval", "evaluation"))


def _verdict(phase: dict[str, Any]) -> str:
    if phase["meets_target"] is None:
        return "-"
    return "yes" if phase["meets_target"] else "NO"


def _target(phase: dict[str, Any]) -> str:
    return "-" if phase["target"] is None else f">= {phase['target']:.1f}x"


def _rows(report: dict[str, Any], short: bool = False) -> list[list[str]]:
    """One row of _HEADER cells per dataset and phase; `short` names phases train/eval."""
    rows = []
    for result in report["results"]:
        for key, label in _PHASES:
            phase = result[key]
            rows.append(
                [
                    result["dataset"],
                    result["model"],
                    result["norm"],
                    key if short else label,
                    f"{phase['images']:,}",
                    f"{phase['normcli_images_per_s']:,.0f}",
                    f"{phase['reference_images_per_s']:,.0f}",
                    f"{phase['ratio']:.2f}x",
                    _target(phase),
                    _verdict(phase),
                ]
            )
    return rows


_HEADER = [
    "dataset",
    "model",
    "norm",
    "phase",
    "images/round",
    "normcli img/s",
    "reference img/s",
    "ratio A/B",
    "target",
    "met",
]


def print_table(report: dict[str, Any]) -> None:
    """The summary as a rich table on stderr (model and norm in the caption, to stay narrow)."""
    table = Table(
        title=f"images/second, median of {report['settings']['rounds']} round(s)",
        caption="; ".join(
            f"{r['dataset']}: {r['model']}, {r['norm']}, batch {r['batch_size']}"
            for r in report["results"]
        ),
    )
    for name in ("dataset", "phase", "images", "normcli", "course", "A/B", "target", "met"):
        table.add_column(name, justify="left" if name in ("dataset", "phase") else "right")
    for row in _rows(report, short=True):
        dataset, _, _, phase, *numbers = row
        table.add_row(dataset, phase, *numbers)
    console.print(table)


def _round_rows(report: dict[str, Any]) -> list[str]:
    def cells(values: list[float | None], fmt: str) -> str:
        return ", ".join("-" if v is None else format(v, fmt) for v in values)

    lines = []
    for result in report["results"]:
        for key, _ in _PHASES:
            r = result[key]["rounds"]
            row = [
                result["dataset"],
                key,
                cells(r["normcli_images_per_s"], ",.0f"),
                cells(r["reference_images_per_s"], ",.0f"),
                cells(r["ratio"], ".2f"),
                cells(r["reference_first_batch_s"], ".2f"),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: machine, command, table, method."""
    m, s = report["machine"], report["settings"]
    lines = [
        "# Throughput: normcli's pipeline vs the usual course pipeline",
        "",
        *smoke_banner(s["quick"]),
        f"Measured {report['date']} on one machine: `{m['lscpu_model_name']}`, "
        f"{m['cpus']} cores ({m['usable_cpus']} usable), {m['torch_threads']} torch threads, "
        f"OpenMP {openmp_policy(m)}; "
        f"torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}. "
        f"1-minute load average {report['load_average'][0]:.2f} before the run, "
        f"{report['load_average'][1]:.2f} after.",
        "",
        *command_block(report["command"]),
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(_HEADER))) + "|",
        *("| " + " | ".join(row) + " |" for row in _rows(report)),
        "",
        f"Medians over {s['rounds']} round(s); the ratio is the median of the per-round ratios "
        "(A and B measured next to each other). Per round (the reference's wait for its first "
        "batch, worker start-up included, is part of its time):",
        "",
        "| dataset | phase | normcli img/s | reference img/s | ratio | reference first batch, s |",
        "|---|---|---:|---:|---:|---:|",
        *_round_rows(report),
        "",
        "- **A (normcli)**: splits in memory as uint8, batches sliced and augmented as whole "
        "batches (`normcli.data.batches`, the dataset's augmentation), `normcli.train.new_run` + "
        "`train_epoch` (SGD Nesterov + one-cycle, channels_last); evaluation "
        f"`normcli.evaluate.evaluate`, batches of {EVAL_BATCH_SIZE}, inference_mode, "
        "channels_last, BatchNorm folded into the preceding convolutions; on "
        f"{s.get('threads', m['torch_threads'])} torch thread(s).",
        "- **B (reference)**: `torchvision.datasets.MNIST` / a CIFAR-10 binary dataset "
        "returning PIL images, per-sample `RandomAffine(7, translate=(2/28, 2/28))` (MNIST) or "
        f"`RandomCrop(32, padding={get_dataset('cifar10').augment.crop_padding})` + "
        "`RandomHorizontalFlip()` (CIFAR-10), `ToTensor`, "
        f"`Normalize`; `DataLoader(shuffle=True, num_workers={s['workers']}, "
        "persistent_workers=False)`; same model and initial weights, same optimizer and "
        "schedule, contiguous memory format. Evaluation: DataLoader with ToTensor + Normalize, "
        f"{s['workers']} workers, the training batch size (the course builds its test loader "
        "from the same arguments), `torch.no_grad`. The main process runs "
        f"{s['reference_threads']} torch thread(s); DataLoader gives each worker 1. "
        f"OpenMP: A under {openmp_policy(m)}; B in "
        f"{s.get('reference_openmp', 'the same process as A')}.",
        "- **Timed**: one epoch per round (or `--images` images), from the first batch request "
        "to the last step, so B's worker start-up and shutdown are counted: with "
        "`persistent_workers=False` the course pays them every epoch. Not timed: reading the "
        "files (once per run in both), building model and optimizer, one warm-up of a few "
        "batches per pipeline.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
# Closed choices for --help, from the library's tables.
DatasetName = Enum("DatasetName", {name: name for name in DATASETS}, type=str)
Norm = Enum("Norm", {name: name for name in NORMS}, type=str)


@app.command()
def main(
    dataset: Annotated[
        list[DatasetName], typer.Option(help="Dataset; repeat the option for several.")
    ] = [DatasetName.mnist],  # noqa: B006 - Typer reads the default, nothing mutates it
    model: Annotated[
        str | None, typer.Option(help="Registry name; default: the dataset's default model.")
    ] = None,
    norm: Annotated[Norm, typer.Option(help="Norm of the model in both pipelines.")] = Norm.bn,  # type: ignore[attr-defined]
    groups: Annotated[int | None, typer.Option(help="Groups for gn (default 4).")] = None,
    batch_size: Annotated[int, typer.Option(help="Training images per step, both.")] = 128,
    rounds: Annotated[int, typer.Option(help=f"A/B rounds, at least {MIN_ROUNDS}.")] = MIN_ROUNDS,
    images: Annotated[
        int | None,
        typer.Option(help="Training images per round. Default: the whole training split."),
    ] = None,
    eval_images: Annotated[
        int | None, typer.Option(help="Test images per round. Default: the whole test split.")
    ] = None,
    reference_eval_batch_size: Annotated[
        int | None, typer.Option(help="Reference test-loader batch size. Default: --batch-size.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Reference DataLoader workers.")] = REFERENCE_WORKERS,
    reference_threads: Annotated[
        int | None,
        typer.Option(help="Torch threads of the reference's main process. Default: torch's."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads of normcli's side. Default: torch's."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help=f"Data folder. Default: ${DATA_ENV}, else ../shared/data.", show_default=False
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON report here ('-': stdout).")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write the Markdown report here ('-': stdout).")
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Smoke run: tiny generated data (--data-dir ignored), 1 round."
        ),
    ] = False,
    reference_spin: Annotated[
        str,
        typer.Option(
            help="GOMP_SPINCOUNT of the reference's own process (default: libgomp's, as a "
            "notebook runs); 'same' runs it in this process under normcli's policy."
        ),
    ] = LIBGOMP_SPIN,
    reference_worker: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Images/second of normcli's training and evaluation vs the usual DataLoader pipeline."""
    if reference_worker is not None:
        reference_worker_loop(json.loads(reference_worker))
        return
    if reference_spin != "same" and not reference_spin.isdigit():
        raise typer.BadParameter("a spin count (digits) or 'same'", param_hint="--reference-spin")
    try:
        report = run(
            datasets=[d.value for d in dict.fromkeys(dataset)],
            model=model,
            norm=norm.value,
            groups=groups,
            batch_size=batch_size,
            rounds=rounds,
            images=images,
            eval_images=eval_images,
            reference_eval_batch_size=reference_eval_batch_size,
            workers=workers,
            reference_threads=reference_threads,
            threads=threads,
            data_dir=data_dir,
            quick=quick,
            reference_spin=None if reference_spin == "same" else reference_spin,
        )
    except NormcliError as e:
        console.print(f"error: {e}", style="red", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    print_table(report)
    if json_path is not None:
        write_text(json_path, json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        write_text(markdown, render_markdown(report))


def run(
    *,
    datasets: list[str],
    model: str | None = None,
    norm: str = "bn",
    groups: int | None = None,
    batch_size: int = 128,
    rounds: int = MIN_ROUNDS,
    images: int | None = None,
    eval_images: int | None = None,
    reference_eval_batch_size: int | None = None,
    workers: int = REFERENCE_WORKERS,
    reference_threads: int | None = None,
    threads: int | None = None,
    data_dir: Path | None = None,
    quick: bool = False,
    reference_spin: str | None = LIBGOMP_SPIN,
) -> dict[str, Any]:
    """Measure every dataset in `datasets`; the report as a JSON-able dict. `reference_spin`:
    B's GOMP_SPINCOUNT, in a process of its own; None: B in this process, A's policy."""
    # Every option checked before any data is read or any round runs.
    run_options = [
        {"dataset": d, "model": model, "norm": norm, "groups": groups, "batch_size": batch_size}
        for d in datasets
    ]
    configs = [RunSpec.from_options(**options).resolve() for options in run_options]
    if quick:
        rounds = 1
    elif rounds < MIN_ROUNDS:
        raise NormcliError(f"--rounds must be at least {MIN_ROUNDS}, got {rounds}")
    if workers < 0:
        raise NormcliError(f"--workers must not be negative, got {workers}")
    for option, value in (("--reference-threads", reference_threads), ("--threads", threads)):
        if value is not None and value <= 0:
            raise NormcliError(f"{option} must be positive, got {value}")
    if reference_eval_batch_size is not None and reference_eval_batch_size <= 0:
        raise NormcliError("--reference-eval-batch-size must be positive")
    machine = machine_info()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="normcli-bench-") as tmp:
        if quick:
            root = Path(tmp)
            for d in datasets:
                write_synthetic(d, root, QUICK_TRAIN, QUICK_TEST)
        else:
            root = data_dir or Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
        results = []
        common = {"images": images, "eval_images": eval_images, "workers": workers,
                  "reference_eval_batch_size": reference_eval_batch_size,
                  "reference_threads": reference_threads}  # fmt: skip
        for config, options in zip(configs, run_options, strict=True):
            bench, n_eval = load_bench(config, root, threads=threads, **common)
            reference = (
                InProcessReference(bench)
                if reference_spin is None
                else ReferenceProcess({"run": options, "root": str(root), **common}, reference_spin)
            )
            try:
                results.append(measure(bench, n_eval, rounds, quick, reference))
            finally:
                reference.close()
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "load_average": [load_before, os.getloadavg()[0]],
        "settings": {
            "rounds": rounds,
            "quick": quick,
            "data_dir": "(generated)" if quick else str(root),
            "workers": workers,
            "reference_threads": reference_threads or torch.get_num_threads(),
            "threads": threads or torch.get_num_threads(),
            "warmup_batches": WARMUP_BATCHES,
            "reference_openmp": "same process as A"
            if reference_spin is None
            else f"own process, GOMP_SPINCOUNT={reference_spin}",
        },
        "results": results,
    }


if __name__ == "__main__":
    app()
