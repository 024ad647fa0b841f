"""Packing: `normcli sweep` against the same runs one after another, in runs per minute.

    python bench/sweep_packing.py --limit 5000 --epochs 2 --seeds 1,2,3 \\
        --json bench/results/sweep_packing.json --markdown bench/results/sweep_packing.md

Both run the grid norm bn, gn, ln x seeds with the same options: one `normcli sweep --workers
N` (one thread per run, its embedded Ray's start and stop included), and the same runs as
`normcli train` commands one after another at torch's default thread count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import machine  # bench/machine.py: a script's folder is on sys.path
import typer

from normcli.checkpoint import read_metadata

NORMS = ("bn", "gn", "ln")


def normcli(*args: str | Path) -> float:
    """Seconds one normcli command took, its output discarded; a failure stops the benchmark."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "normcli", *map(str, args)], check=True,
                   env=machine.checkout_env(dict(os.environ)), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def render_markdown(r: dict[str, Any]) -> str:
    """The report as a short Markdown page."""
    sweep = f"`normcli sweep --workers {r['settings']['workers']}` (1 thread per run, Ray)"
    rows = [[how, f"{seconds:.1f}", f"{60 * r['runs'] / seconds:.2f}"] for how, seconds in (
        ("`normcli train` one after another (default threads)", r["sequential_seconds"]),
        (sweep, r["sweep_seconds"]))]  # fmt: skip
    return machine.page(
        r, __doc__, f"{r['runs']} runs (norm bn, gn, ln x seeds), each `{' '.join(r['options'])}`.",
        "", *machine.table(["how", "wall (s)", "runs per minute"], rows),
        f"Throughput ratio: **{r['sequential_seconds'] / r['sweep_seconds']:.2f}x**.", "",
    )  # fmt: skip


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    limit: Annotated[int, typer.Option(help="Training images per run.")] = 5000,
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 2,
    seeds: Annotated[str, typer.Option(help="Comma list.")] = "1,2",
    workers: Annotated[int, typer.Option(help="Sweep workers.")] = os.cpu_count() or 1,
    data_dir: machine.DataDirOpt = None,
    json_path: machine.JsonOpt = None,
    markdown: machine.MarkdownOpt = None,
    quick: machine.QuickOpt = False,
) -> None:
    """Runs per minute of `normcli sweep` against the same `normcli train` commands in turn."""
    seed_list = [int(s) for s in seeds.split(",")][: 1 if quick else None]
    limit, epochs = (100, 1) if quick else (limit, epochs)
    options = ["--dataset", "mnist", "--epochs", str(epochs), "--limit", str(limit),
               "--device", "cpu"]  # fmt: skip
    report = machine.new_report(settings={"seeds": seed_list, "workers": workers, "quick": quick},
                                options=options, runs=len(NORMS) * len(seed_list))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="normcli-packing-") as tmp:
        root = machine.data_root(data_dir, quick, Path(tmp), ("mnist",), (100, 50))
        run_options = [*options, "--data-dir", str(root)]
        report["sequential_seconds"] = sum(
            normcli("train", "--norm", norm, "--seed", seed, *run_options,
                    "--out", Path(tmp) / f"{norm}_{seed}.safetensors")
            for norm in NORMS for seed in seed_list
        )  # fmt: skip
        report["sweep_seconds"] = normcli(
            "sweep", "--norm", ",".join(NORMS), "--seed", ",".join(map(str, seed_list)),
            *run_options, "--workers", workers, "--out", Path(tmp) / "sweep",
        )  # fmt: skip
        report["sweep_final_test_accuracy"] = {
            p.stem: read_metadata(p).history[-1]["test_accuracy"]
            for p in sorted((Path(tmp) / "sweep").glob("*.safetensors"))
        }
    report["load_average_after"] = machine.load_average()
    print(render_markdown(report), file=sys.stderr)
    machine.write_reports(report, json_path, markdown, render_markdown)


if __name__ == "__main__":
    machine.run_app(app)
