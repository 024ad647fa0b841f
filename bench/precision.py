"""Training-step speed by precision and layout: float32 against bfloat16 autocast,
channels_last against contiguous, for mnist_net and cifar_net with BN and GN, on 1 and 2
threads, A/B alternated in one run.

    python bench/precision.py --json bench/results/precision.json \\
        --markdown bench/results/precision.md
    python bench/precision.py --quick        # smoke run: one round, one step

Every configuration (model, norm, threads) times normcli's own trial step
(normcli.tuning.training_step: a fresh network, SGD with Nesterov momentum, forward and
cross-entropy under the precision's autocast) on one synthetic batch of the dataset's shape.
Its four variants take turns, --steps steps each, round after round, each leading in turn; a
round gives a variant its median step. Reported: the median images/s over the rounds and the
median of the per-round ratios, so that the load of a shared machine, which drifts, falls
mostly out of the ratios: those are the figures to read.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import machine  # bench/machine.py: a script's folder is on sys.path
import torch
import typer

from normcli.config import ModelArgs
from normcli.data import get_dataset
from normcli.tuning import cpu_facts, option_label, training_step

CONFIGS = (("mnist", "bn"), ("mnist", "gn"), ("cifar10", "bn"), ("cifar10", "gn"))
VARIANTS = (("fp32", True), ("bf16", True), ("fp32", False), ("bf16", False))
RATIOS = {  # name -> (numerator, denominator)
    "bf16 / fp32, channels_last": ("bf16 channels_last", "fp32 channels_last"),
    "bf16 / fp32, contiguous": ("bf16 contiguous", "fp32 contiguous"),
    "channels_last / contiguous, fp32": ("fp32 channels_last", "fp32 contiguous"),
    "channels_last / contiguous, bf16": ("bf16 channels_last", "bf16 contiguous"),
}


def measure(
    dataset: str, norm: str, threads: int, batch: int, rounds: int, steps: int
) -> dict[str, Any]:
    """Per-round images/s of every variant of one configuration."""
    torch.set_num_threads(threads)
    model = ModelArgs(dataset=dataset, norm=norm).resolve()
    spec = get_dataset(dataset)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *spec.input_shape, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    torch.manual_seed(0)
    trainers = {option_label(*v): training_step(model, *v, x, y) for v in VARIANTS}
    for step in trainers.values():  # warm-up: kernel selection, buffers
        step()
        step()
    per_round: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(rounds):
        names = list(trainers)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                trainers[name]()
                times.append(time.perf_counter() - start)
            per_round[name].append(batch / statistics.median(times))
    return {"dataset": dataset, "model": model.model, "norm": norm, "threads": threads,
            "batch": batch, "images_per_second": per_round,
            "summary": summarize(per_round)}  # fmt: skip


def summarize(per_round: dict[str, list[float]]) -> dict[str, Any]:
    """Median images/s per variant, median per-round ratios, and the fastest variant."""
    medians = {name: statistics.median(v) for name, v in per_round.items()}
    ratios = {
        name: statistics.median(a / b for a, b in zip(per_round[n], per_round[d], strict=True))
        for name, (n, d) in RATIOS.items()
    }
    return {"median": medians, "ratios": ratios, "fastest": max(medians, key=medians.get)}


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: the CPU's facts, speeds, ratios, settings and method."""
    cpu, results = report["cpu"], report["results"]
    names = [option_label(*v) for v in VARIANTS]
    head = [([r["model"], r["norm"], r["threads"]], r["summary"]) for r in results]
    speeds = [[*h, *(f"{s['median'][n]:,.0f}" for n in names), s["fastest"]] for h, s in head]
    ratios = [[*h, *(f"{s['ratios'][n]:.2f}" for n in RATIOS)] for h, s in head]
    return machine.page(
        report, __doc__,
        f"CPU model (/proc/cpuinfo, normcli.tuning's cache key): `{cpu['model_name']}`; "
        f"bf16-relevant flags: {', '.join(cpu['bf16_flags']) or 'none'}.", "",
        "Images per second (median over rounds):", "",
        *machine.table(["model", "norm", "threads", *names, "fastest"], speeds),
        "Ratios (median of per-round ratios; > 1: the first is faster):", "",
        *machine.table(["model", "norm", "threads", *RATIOS], ratios),
        title="Training step: precision and layout",
    )  # fmt: skip


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    rounds: Annotated[int, typer.Option(help="A/B rounds per configuration.", min=1)] = 5,
    steps: Annotated[int, typer.Option(help="Timed steps per variant and round.", min=1)] = 4,
    batch: Annotated[int, typer.Option(help="Images per step.", min=1)] = 128,
    threads: Annotated[str, typer.Option(help="Thread counts, comma-separated.")] = "1,2",
    json_path: machine.JsonOpt = None,
    markdown: machine.MarkdownOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: 1 round, 1 step.")] = False,
) -> None:
    """Time the training step of every configuration in every precision and layout."""
    if quick:
        rounds, steps, batch = 1, 1, 16
    facts = cpu_facts()
    counts = [int(t) for t in threads.split(",")]
    report = machine.new_report(
        settings={"rounds": rounds, "steps": steps, "batch": batch, "threads": counts,
                  "quick": quick},
        cpu={"model_name": facts.model_name, "flags_hash": facts.flags_hash,
             "bf16_flags": sorted(f for f in facts.flags if "bf16" in f or f.startswith("amx"))},
    )  # fmt: skip
    results = report["results"] = []
    for count in counts:
        for dataset, norm in CONFIGS:
            print(f"{dataset} {norm} threads {count} ...", file=sys.stderr)
            results.append(measure(dataset, norm, count, batch, rounds, steps))
    report["load_average_after"] = machine.load_average()
    machine.write_reports(report, json_path, markdown or Path("-"), render_markdown)


if __name__ == "__main__":
    machine.run_app(app)
