"""Throughput: normcli's in-memory, batch-augmented pipeline vs the usual course pipeline.

    python bench/throughput.py --dataset mnist --dataset cifar10 --rounds 3 --images 25600 \\
        --json bench/results/throughput.json --markdown bench/results/throughput.md

A (normcli): the split in memory as uint8, shuffled batches sliced from it and augmented as
whole batches, the library's own training step (normcli.train.new_run, train_epoch);
evaluation by normcli.evaluate.evaluate (inference_mode, channels_last, BatchNorm folded).
B (the course's): a torchvision dataset returning PIL images, per-sample transforms doing what
A's augmentation does, ToTensor, Normalize, DataLoader(shuffle=True, num_workers=2,
persistent_workers=False); the same model, initial weights, optimizer, schedule and batch size,
contiguous memory; evaluation through a DataLoader of the test set with the same arguments,
under torch.no_grad. Both keep torch's thread count, as the course does (--threads,
--reference-threads to choose); A under normcli's OpenMP policy for this process
(normcli.runtime.configure_threads: libgomp's default spin for a lone run, GOMP_SPINCOUNT=1000
with --threads below the core count), B in a process of its own under libgomp's default spin,
as a notebook runs (--reference-spin). A trains in the precision and layout normcli.tuning
chooses for this CPU (the report names them), B in float32, contiguous.

Each round times A, B, A, B: one epoch of --images training images (default: the split), from
the first batch request to the last step, B's worker start-up and shutdown included (the
course pays them every epoch; its wait for a first batch is recorded too), then one pass over
the test split (or --eval-images). Not timed: reading the files, building model and optimizer,
a warm-up of a few batches per pipeline. The ratio A/B is taken per round (slow drifts of the
machine cancel); its median is checked against TARGETS. --quick: one round on tiny generated
data, without warm-up or targets.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from normcli.runtime import configure_threads

# normcli's OpenMP wait policy for both pipelines (the caller's environment wins); before
# torch loads, as OpenMP reads it then: hence the imports below it.
# ruff: noqa: E402
configure_threads()

import machine  # bench/machine.py: a script's folder is on sys.path
import torch
import torch.nn.functional as F
import torchvision
import typer
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset
from torch.utils.data import Dataset as TorchDataset
from torchvision import transforms as T

from normcli.config import RunSpec
from normcli.data import DATASETS, Dataset, Split, get_dataset, load_split
from normcli.errors import NormcliError
from normcli.evaluate import EVAL_BATCH_SIZE, evaluate
from normcli.norms import NORMS
from normcli.run import new_run
from normcli.runtime import use_threads
from normcli.train import train_epoch
from normcli.tuning import choose

REFERENCE_WORKERS = 2  # the course's DataLoader num_workers
MIN_ROUNDS = 3
WARMUP_BATCHES = 3  # per pipeline, before the first round, not timed
LIBGOMP_SPIN = "300000"  # libgomp's default GOMP_SPINCOUNT: what a notebook's torch runs with
CPU = torch.device("cpu")
PHASES = {"train": "training", "eval": "evaluation"}
# Minimum median ratio A/B, per (dataset, phase), on the 2-core machine at batch size 128.
TARGETS = {("mnist", "train"): 2.5, ("cifar10", "train"): 1.5,
           ("mnist", "eval"): 3.0, ("cifar10", "eval"): 3.0}  # fmt: skip


def reference_transform(spec: Dataset, train: bool) -> T.Compose:
    """Per-sample PIL transforms doing what the dataset's augmentation does to whole batches:
    same ranges, torchvision's RandomAffine defaults (nearest-neighbour, whole-pixel shifts)
    where normcli resamples bilinearly with sub-pixel shifts, as a course would write it."""
    tail = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    augment, (_, h, w) = spec.augment, spec.input_shape
    head: list[nn.Module] = []
    if train and (augment.degrees or augment.shift):  # rotation U(-deg, deg), shift U(-px, px)
        head.append(
            T.RandomAffine(augment.degrees, translate=(augment.shift / w, augment.shift / h))
        )
    if train and augment.crop_padding:
        head.append(T.RandomCrop((h, w), padding=augment.crop_padding))
    if train and augment.flip:
        head.append(T.RandomHorizontalFlip())
    return T.Compose(head + tail)


class CifarBinary(TorchDataset):
    """CIFAR-10 as torchvision serves it (a PIL image per item), from the binary files that
    torchvision does not read."""

    def __init__(self, root: Path, train: bool, transform: T.Compose) -> None:
        split = load_split("cifar10", train, root, download_missing=False)
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets, self.transform = split.labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


@functools.cache  # read once per process, on first use: only the process running B reads it
def reference_dataset(name: str, root: Path, train: bool) -> TorchDataset:
    """The course's dataset object: torchvision's MNIST, or CifarBinary."""
    spec = get_dataset(name)
    transform = reference_transform(spec, train)
    if spec.name == "mnist":
        return torchvision.datasets.MNIST(str(root), train=train, transform=transform)
    return CifarBinary(root, train, transform)


@dataclass
class Bench:
    """What both pipelines need for one dataset, loaded once."""

    run: RunSpec  # resolved; B uses it with channels_last=False
    spec: Dataset
    data_dir: Path
    train_split: Split  # A's, in memory (B's schedule is built from it too)
    test_split: Split
    images: dict[str, int]  # per round and phase
    workers: int
    reference_threads: int | None  # torch threads of B's main process; None: torch's default
    threads: int | None  # torch threads of A; None: torch's default


@dataclass
class Timing:
    images: int
    seconds: float
    first_batch_seconds: float | None = None  # B only: worker start-up + first batch

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def normcli_pass(
    bench: Bench, train: bool, images: int, model: nn.Module | None
) -> tuple[Timing, nn.Module]:
    """A: one training epoch of `images` images, or one evaluation of `model` on as many."""
    if train:
        run = new_run(bench.run, bench.train_split.head(images), bench.test_split.head(1), CPU)
        model = run.model
    assert model is not None
    gc.collect()
    with use_threads(bench.threads):
        start = time.perf_counter()
        if train:
            train_epoch(run)
        else:
            evaluate(model, bench.test_split.head(images), bench.spec, EVAL_BATCH_SIZE)
        return Timing(images, time.perf_counter() - start), model


def reference_pass(
    bench: Bench, train: bool, images: int, model: nn.Module | None
) -> tuple[Timing, nn.Module]:
    """B: one training epoch of `images` images, or one test pass of `model` on as many."""
    optimizer = scheduler = None
    if train:
        config = dataclasses.replace(bench.run.train, channels_last=False)
        state = new_run(RunSpec(bench.run.model, config), bench.train_split.head(images),
                        bench.test_split.head(1), CPU)  # fmt: skip
        model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
        # A's init, optimizer and schedule; RandomSampler is what shuffle=True builds, and
        # num_samples makes the epoch `images` long (no prefetched batch wasted).
        data = reference_dataset(bench.spec.name, bench.data_dir, True)
        sampler = RandomSampler(data, num_samples=images)
    else:  # the course builds its test loader with the training loader's arguments
        data = Subset(reference_dataset(bench.spec.name, bench.data_dir, False), range(images))
        sampler = None
    loader = DataLoader(data, batch_size=bench.run.train.batch_size, sampler=sampler,
                        num_workers=bench.workers, persistent_workers=False)  # fmt: skip
    assert model is not None
    model.train(train)
    loss_sum, correct, seen, first = 0.0, 0, 0, None
    gc.collect()
    with use_threads(bench.reference_threads), torch.set_grad_enabled(train):
        start = time.perf_counter()
        for x, y in loader:  # exhausting the loader also stops its workers: counted
            first = time.perf_counter() - start if first is None else first
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if optimizer is not None and scheduler is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            loss_sum += loss.item() * y.shape[0]  # the course logs loss and accuracy
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        return Timing(seen, time.perf_counter() - start, first), model


class Pipeline:
    """A or B in this process; a training phase keeps its model for the evaluation after it."""

    def __init__(self, bench: Bench, reference: bool) -> None:
        self.bench, self.model = bench, None
        self.measure = reference_pass if reference else normcli_pass

    def phase(self, name: str, images: int) -> Timing:
        timing, self.model = self.measure(self.bench, name == "train", images, self.model)
        return timing

    def close(self) -> None:
        pass


class ReferenceProcess:
    """B in a process of its own under its own OpenMP spin count, one phase per request."""

    def __init__(self, options: dict[str, Any], spin: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--reference-worker", json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=machine.checkout_env({**env, "GOMP_SPINCOUNT": spin}),
        )  # fmt: skip

    def phase(self, name: str, images: int) -> Timing:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{name} {images}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise NormcliError(f"the reference process ended (exit {self.proc.wait()})")
        return Timing(**json.loads(answer))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def reference_worker_loop(options: dict[str, Any]) -> None:
    """The other end of ReferenceProcess: 'train N' / 'eval N' lines in, Timing JSON out."""
    reference = Pipeline(load_bench(**options), reference=True)
    for line in sys.stdin:
        name, images = line.split()
        print(json.dumps(dataclasses.asdict(reference.phase(name, int(images)))), flush=True)


def load_bench(
    run: dict[str, Any], root: str, images: int | None, eval_images: int | None, workers: int,
    reference_threads: int | None, threads: int | None,
) -> Bench:  # fmt: skip
    """Read both pipelines' data once (`run`: RunSpec options; `root`: the data folder)."""
    spec = RunSpec.from_options(**run).resolve()
    train = load_split(spec.model.dataset, True, root, download_missing=False)
    test = load_split(spec.model.dataset, False, root, download_missing=False)
    counts = {
        "train": (images, len(train), "--images"),
        "eval": (eval_images, len(test), "--eval-images"),
    }
    for value, size, option in counts.values():
        if value is not None and not 0 < value <= size:
            raise NormcliError(f"{option} must be 1 to {size} for {run['dataset']}, got {value}")
    images_per_phase = {phase: value or size for phase, (value, size, _) in counts.items()}
    return Bench(spec, get_dataset(spec.model.dataset), Path(root), train, test, images_per_phase,
                 workers, reference_threads, threads)  # fmt: skip


def summarize(a: list[Timing], b: list[Timing], target: float | None) -> dict[str, Any]:
    """Per-round img/s of both pipelines, per-round ratios, medians, and the target check."""
    a_rate, b_rate = [t.images_per_second for t in a], [t.images_per_second for t in b]
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
            "normcli_images_per_s": a_rate, "reference_images_per_s": b_rate, "ratio": ratios,
            "normcli_seconds": [t.seconds for t in a], "reference_seconds": [t.seconds for t in b],
            "reference_first_batch_s": [t.first_batch_seconds for t in b],
        },
    }  # fmt: skip


def measure(bench: Bench, rounds: int, quick: bool, reference: Any) -> dict[str, Any]:
    """Warm-up, then `rounds` rounds of A, B (training), A, B (evaluation); the summary."""
    m, config = bench.run.model, bench.run.train
    normcli, timings = Pipeline(bench, reference=False), {}
    if not quick:  # a smoke run is all warm-up
        n = min(WARMUP_BATCHES * config.batch_size, len(bench.train_split))
        for phase, images in (("train", n), ("eval", min(n, bench.images["eval"]))):
            normcli.phase(phase, images), reference.phase(phase, images)
    for r in range(rounds):
        for phase in PHASES:
            for side, pipeline in (("a", normcli), ("b", reference)):
                timings.setdefault(f"{side}_{phase}", []).append(
                    pipeline.phase(phase, bench.images[phase])
                )
        rates = [f"{timings[k][-1].images_per_second:,.0f}" for k in timings]
        print(f"{m.dataset} round {r + 1}/{rounds}: train {rates[0]} vs {rates[1]} img/s, "
              f"eval {rates[2]} vs {rates[3]} img/s", file=sys.stderr)  # fmt: skip
    with use_threads(bench.threads):  # A's precision and layout, as its runs chose them
        chosen = choose(bench.run, CPU)
    return {
        "dataset": m.dataset, "model": m.model, "norm": m.norm, "groups": m.groups,
        "batch_size": config.batch_size, "precision": chosen.precision,
        "channels_last": chosen.channels_last,
        "normcli_eval_batch_size": EVAL_BATCH_SIZE, "reference_workers": bench.workers,
        "reference_threads": bench.reference_threads or torch.get_num_threads(),
        "rounds": rounds,
        **{phase: summarize(timings[f"a_{phase}"], timings[f"b_{phase}"],
                            None if quick else TARGETS.get((m.dataset, phase)))
           for phase in PHASES},
    }  # fmt: skip


def summary_table(report: dict[str, Any]) -> list[str]:
    """One row per dataset and phase: medians, ratio (and each round's), target, verdict."""
    rows = []
    for result in report["results"]:
        for key, label in PHASES.items():
            p = result[key]
            met = "-" if p["meets_target"] is None else "yes" if p["meets_target"] else "NO"
            target = "-" if p["target"] is None else f">= {p['target']:.1f}x"
            each = ", ".join(f"{r:.2f}" for r in p["rounds"]["ratio"])
            rows.append([result["dataset"], result["model"], result["norm"], label,
                         f"{p['images']:,}", f"{p['normcli_images_per_s']:,.0f}",
                         f"{p['reference_images_per_s']:,.0f}", f"{p['ratio']:.2f}x ({each})",
                         target, met])  # fmt: skip
    columns = ["dataset", "model", "norm", "phase", "images/round", "normcli img/s",
               "reference img/s", "ratio A/B (rounds)", "target", "met"]  # fmt: skip
    return machine.table(columns, rows)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: the summary, settings and method."""
    chosen = "; ".join(f"{r['dataset']} {r.get('precision', 'fp32')}, "
                       f"{'channels_last' if r['channels_last'] else 'contiguous'}"
                       for r in report["results"])  # fmt: skip
    layouts = f"A's precision and layout (normcli.tuning; B: fp32, contiguous): {chosen}.\n"
    return machine.page(report, __doc__, *summary_table(report), layouts)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
# Closed choices for --help, from the library's tables.
DatasetName = Enum("DatasetName", {name: name for name in DATASETS}, type=str)
Norm = Enum("Norm", {name: name for name in NORMS}, type=str)


@app.command()
def main(
    dataset: Annotated[list[DatasetName], typer.Option(help="Dataset; repeatable.")] = [  # noqa: B006
        DatasetName.mnist  # Typer reads the default, nothing mutates it
    ],
    model: Annotated[str | None, typer.Option(help="Default: the dataset's model.")] = None,
    norm: Annotated[Norm, typer.Option(help="Norm of the model in both pipelines.")] = Norm.bn,  # type: ignore[attr-defined]
    groups: Annotated[int | None, typer.Option(help="Groups for gn (default 4).")] = None,
    batch_size: Annotated[int, typer.Option(help="Training images per step, both.")] = 128,
    rounds: Annotated[int, typer.Option(help="A/B rounds.", min=MIN_ROUNDS)] = MIN_ROUNDS,
    images: Annotated[int | None, typer.Option(help="Training images per round (all).")] = None,
    eval_images: Annotated[int | None, typer.Option(help="Test images per round (all).")] = None,
    workers: Annotated[
        int, typer.Option(help="B's DataLoader workers.", min=0)
    ] = REFERENCE_WORKERS,
    reference_threads: Annotated[int | None, typer.Option(help="B's threads.", min=1)] = None,
    threads: Annotated[int | None, typer.Option(help="A's torch threads.", min=1)] = None,
    reference_spin: Annotated[
        str, typer.Option(help="GOMP_SPINCOUNT of B's own process; 'same': B in A's process.")
    ] = LIBGOMP_SPIN,
    data_dir: machine.DataDirOpt = None,
    json_path: machine.JsonOpt = None,
    markdown: machine.MarkdownOpt = None,
    quick: machine.QuickOpt = False,
    reference_worker: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Images/second of normcli's training and evaluation vs the usual DataLoader pipeline."""
    if reference_worker is not None:
        return reference_worker_loop(json.loads(reference_worker))
    common = {"images": images, "eval_images": eval_images, "workers": workers,
              "reference_threads": reference_threads, "threads": threads}  # fmt: skip
    if reference_spin != "same" and not reference_spin.isdigit():
        raise NormcliError(f"--reference-spin must be digits or 'same', got {reference_spin!r}")
    datasets = [d.value for d in dict.fromkeys(dataset)]
    runs = [{"dataset": d, "model": model, "norm": norm.value, "groups": groups,
             "batch_size": batch_size} for d in datasets]  # fmt: skip
    for run in runs:  # every run option checked before any data is read
        RunSpec.from_options(**run).resolve()
    spin = None if reference_spin == "same" else reference_spin
    report = machine.new_report(settings={
        "rounds": 1 if quick else rounds, "quick": quick, "workers": workers,
        "reference_threads": reference_threads or torch.get_num_threads(),
        "threads": threads or torch.get_num_threads(), "warmup_batches": WARMUP_BATCHES,
        "reference_openmp": f"own process, GOMP_SPINCOUNT={spin}" if spin else "same process as A",
    })  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="normcli-bench-") as tmp:
        root = str(machine.data_root(data_dir, quick, Path(tmp), tuple(datasets)))
        report["settings"]["data_dir"] = "(generated)" if quick else root
        results = report["results"] = []
        for run in runs:
            bench = load_bench(run, root, **common)
            options = {"run": run, "root": root, **common}
            reference = ReferenceProcess(options, spin) if spin else Pipeline(bench, True)
            try:
                results.append(measure(bench, report["settings"]["rounds"], quick, reference))
            finally:
                reference.close()
    report["load_average_after"] = machine.load_average()
    print("\n".join(summary_table(report)), file=sys.stderr)
    machine.write_reports(report, json_path, markdown, render_markdown)


if __name__ == "__main__":
    machine.run_app(app)
