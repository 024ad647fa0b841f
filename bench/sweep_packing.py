"""Packing: a sweep of N short MNIST runs against the same `normcli train` commands one
after another (each at torch's default thread count), in runs per minute.

    python bench/sweep_packing.py [--data-dir DIR] [--limit 5000] [--epochs 2] [--seeds 1,2]
                                  [--out bench/results/sweep_packing]   # writes .md and .json
    python bench/sweep_packing.py --smoke                               # tiny generated data

Both sides run the same grid (norm bn, gn, ln x seeds) with the same options; the sweep's wall
time includes starting and stopping its embedded Ray. Run it on a quiet machine: the load
average before and after is recorded next to the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from normcli.checkpoint import read_metadata
from normcli.data import write_synthetic

REPO = Path(__file__).resolve().parents[1]
NORMS = ("bn", "gn", "ln")


def cpu_model() -> str:
    """The CPU's model name (lscpu), or the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def normcli(*args: str | Path) -> None:
    """Run one normcli command, its output discarded; a failure stops the benchmark."""
    cmd = [sys.executable, "-m", "normcli", *map(str, args)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sequential(data: Path, out: Path, common: list[str], seeds: list[int]) -> float:
    """Seconds for every run as its own `normcli train`, one after another."""
    start = time.perf_counter()
    for norm in NORMS:
        for seed in seeds:
            normcli("train", "--norm", norm, "--seed", str(seed), *common, "--data-dir", data,
                    "--out", out / f"{norm}_{seed}.safetensors")  # fmt: skip
    return time.perf_counter() - start


def swept(data: Path, out: Path, common: list[str], seeds: list[int], workers: int) -> float:
    """Seconds for the same runs as one `normcli sweep` (Ray start and stop included)."""
    start = time.perf_counter()
    normcli("sweep", "--norm", ",".join(NORMS), "--seed", ",".join(map(str, seeds)), *common,
            "--data-dir", data, "--workers", str(workers), "--out", out)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    parser.add_argument("--smoke", action="store_true", help="tiny generated data, 1 epoch")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="normcli-packing-") as tmp:
        root = Path(tmp)
        data = args.data_dir
        if args.smoke:
            data = write_synthetic("mnist", root / "data", 100, 50)
            args.limit, args.epochs, seeds = 100, 1, seeds[:1]
        common = ["--dataset", "mnist", "--epochs", str(args.epochs), "--limit", str(args.limit),
                  "--device", "cpu"]  # fmt: skip
        load_before = os.getloadavg()
        (root / "seq").mkdir()
        seq_s = sequential(data, root / "seq", common, seeds)
        sweep_s = swept(data, root / "sweep", common, seeds, args.workers)
        load_after = os.getloadavg()
        runs = len(NORMS) * len(seeds)
        finals = {
            p.stem: read_metadata(p).history[-1]["test_accuracy"]
            for p in sorted((root / "sweep").glob("*.safetensors"))
        }
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "runs": runs,
        "options": common,
        "workers": args.workers,
        "sequential_seconds": round(seq_s, 1),
        "sweep_seconds": round(sweep_s, 1),
        "sequential_runs_per_minute": round(60 * runs / seq_s, 2),
        "sweep_runs_per_minute": round(60 * runs / sweep_s, 2),
        "ratio": round(seq_s / sweep_s, 2),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "sweep_final_test_accuracy": finals,
        "smoke": args.smoke,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))


def markdown(r: dict) -> str:
    """The report as a short Markdown page."""
    return (
        "# Packing: `normcli sweep` against the same runs one after another\n\n"
        f"CPU: {r['cpu']}, {r['cores']} cores; Python {r['python']}. Command: "
        f"`python bench/{r['command']}`. Load average before {r['load_before']}, after "
        f"{r['load_after']}.\n\n"
        f"{r['runs']} runs (norm bn, gn, ln x seeds), each `{' '.join(r['options'])}`.\n\n"
        "| how | wall (s) | runs per minute |\n| --- | ---: | ---: |\n"
        f"| `normcli train` one after another (default threads) | {r['sequential_seconds']} "
        f"| {r['sequential_runs_per_minute']} |\n"
        f"| `normcli sweep --workers {r['workers']}` (1 thread per run, Ray start/stop "
        f"included) | {r['sweep_seconds']} | {r['sweep_runs_per_minute']} |\n\n"
        f"Throughput ratio: **{r['ratio']}x**.\n"
    )


if __name__ == "__main__":
    main()
