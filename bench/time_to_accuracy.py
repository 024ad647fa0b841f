"""Time to accuracy: the whole study, as `make study` runs it, timed and checked.

    python bench/time_to_accuracy.py --dataset mnist --seeds 1 \\
        --json bench/results/time_to_accuracy.json --markdown bench/results/time_to_accuracy.md
    python bench/time_to_accuracy.py --seeds 1,2,3 ...   # the 3-seed table, one study per seed
    python bench/time_to_accuracy.py --quick             # smoke run on tiny generated data

Each study is `examples/compare_norms.sh DATASET --data-dir DIR --out FRESH_DIR --seed S`, the
script `make study` runs, started from nothing trained and timed from start to the printed
table. `normcli` is this checkout (`python -m normcli`, PYTHONPATH at the repository), as
`make study` runs the checkout it installs. After each study the stored histories are checked:

- MNIST: every norm (BN + L1, GN, LN) at >= 99.4% test accuracy in each of its last three
  epochs; over several seeds, each norm's final accuracy averaging >= 99.45%; the study's wall
  time <= 180 s.
- CIFAR-10: wall time and accuracies are reported; no target.

Recorded with every figure: the CPU (lscpu model name, AVX-512 or not), cores, thread settings,
the load average before and after, and the CPU seconds the study used, so a slow figure on a
busy machine shows as such. Training images per second are also given against the ceiling the
machine's float32 matrix-multiply peak allows (FLOPs per training image / peak).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from normcli.entry import configure_threads

# normcli's OpenMP wait policy, set here so the report records it and the study's commands
# inherit it; before torch loads (machine imports it), hence the imports below it.
# ruff: noqa: E402
configure_threads()

import typer
from machine import (
    checkout_env,
    command_block,
    describe,
    load_average,
    machine_info,
    matmul_peak_gflops,
    mean_std,
    openmp_policy,
    smoke_banner,
    training_flops_per_image,
    wait_for_quiet,
    write_text,
)
from rich.console import Console

from normcli.checkpoint import read_metadata
from normcli.config import ModelArgs
from normcli.data import DATA_ENV, get_dataset, write_synthetic

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "compare_norms.sh"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
RUNS = ("bn_l1", "gn", "ln")  # the checkpoints compare_norms.sh writes, in its order
QUICK_TRAIN, QUICK_TEST = 256, 128

# Per dataset: the study's wall-time target (s), the accuracy every run must hold in each of
# its last three epochs, and the least mean final accuracy over seeds (percent).
TARGETS: dict[str, dict[str, float]] = {
    "mnist": {"wall_s": 180.0, "last3_min": 99.4, "final_mean_min": 99.45},
}

console = Console(stderr=True)


def normcli_shim(folder: Path) -> dict[str, str]:
    """An environment whose `normcli` is this checkout run by this Python."""
    shim = folder / "normcli"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m normcli "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    return checkout_env(env)


def step_seconds(log: Path) -> dict[str, int]:
    """The wall time of each step the script logged ('train gn: 51 s')."""
    steps = {}
    for line in log.read_text().splitlines():
        m = re.fullmatch(r"(.+): (\d+) s", line)
        if m:
            steps[m[1]] = int(m[2])
    return steps


def run_study(
    dataset: str, seed: int, data_dir: Path, out: Path, env: dict[str, str], extra: list[str]
) -> dict[str, Any]:
    """One timed study into the empty folder `out`; its runs' histories and step times."""
    cmd = ["bash", str(SCRIPT), dataset, "--data-dir", str(data_dir), "--out", str(out),
           "--seed", str(seed), *extra]  # fmt: skip
    load_before = load_average()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"the study failed (exit {result.returncode}):\n{result.stderr}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    runs = {}
    for name in RUNS:
        meta = read_metadata(out / f"{name}.safetensors")
        t = meta.train_args
        runs[name] = {
            "label": meta.run.label,
            "norm": meta.model_args.norm,
            "epochs": t.epochs,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "l1": t.l1,
            "threads": t.threads,
            "test_accuracy": [row["test_accuracy"] for row in meta.history],
            "train_seconds": sum(row["seconds"] for row in meta.history),
            "train_images_per_epoch": round(
                meta.history[-1]["images_per_second"] * meta.history[-1]["seconds"]
            ),
        }
    return {
        "seed": seed,
        "command": shlex.join(cmd),
        "wall_s": wall,
        "cpu_s": cpu,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "steps_s": step_seconds(out / "log.txt"),
        "table": result.stdout,
        "runs": runs,
    }


def check(dataset: str, studies: list[dict[str, Any]], quick: bool = False) -> dict[str, Any]:
    """Per norm over the seeds: the least accuracy of the last three epochs, the final mean;
    and the verdict on each target (None where the dataset has no target, or for a --quick
    smoke run)."""
    target = TARGETS.get(dataset)
    norms = {}
    for name in RUNS:
        finals = [s["runs"][name]["test_accuracy"][-1] for s in studies]
        last3 = [min(s["runs"][name]["test_accuracy"][-3:]) for s in studies]
        norms[name] = {
            "label": studies[0]["runs"][name]["label"],
            "final": finals,
            "final_mean": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "last3_min": min(last3),
        }
    verdict: dict[str, Any] = {"wall": None, "last3": None, "final_mean": None}
    if target is not None and not quick:
        verdict["wall"] = all(s["wall_s"] <= target["wall_s"] for s in studies)
        verdict["last3"] = all(n["last3_min"] >= target["last3_min"] for n in norms.values())
        verdict["final_mean"] = all(
            n["final_mean"] >= target["final_mean_min"] for n in norms.values()
        )
    return {"target": target, "norms": norms, "met": verdict}


def throughput(
    dataset: str, study: dict[str, Any], machine_threads: int, peak_seconds: float = 2.0
) -> dict[str, Any]:
    """The study's training images per second against the matrix-multiply ceiling."""
    model = ModelArgs(dataset=dataset).resolve().build()
    flops = training_flops_per_image(model, get_dataset(dataset).input_shape)
    peak = matmul_peak_gflops(machine_threads, seconds=peak_seconds)
    images = sum(r["epochs"] * r["train_images_per_epoch"] for r in study["runs"].values())
    train_wall = max(v for k, v in study["steps_s"].items() if k.startswith("train "))
    rate = images / train_wall
    ceiling = peak * 1e9 / flops
    return {
        "flops_per_training_image": flops,
        "matmul_peak_gflops": peak,
        "peak_threads": machine_threads,
        "ceiling_images_per_s": ceiling,
        "training_images": images,
        "training_wall_s": train_wall,
        "training_images_per_s": rate,
        "fraction_of_ceiling": rate / ceiling,
    }


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _acc(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "NO"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    m, c, t = report["machine"], report["check"], report["throughput"]
    target = c["target"]
    quick = report["settings"]["quick"]
    lines = [
        f"# Time to accuracy: `make study DATASET={report['dataset']}`",
        "",
        *smoke_banner(quick),
        f"Measured {report['date']} on {describe(m)}. Each training runs on "
        f"{report['studies'][0]['runs']['gn']['threads']} thread(s), the three at once; "
        # Reports from before normcli's spin default ran its PASSIVE default then.
        f"OpenMP {openmp_policy(m) if 'GOMP_SPINCOUNT' in m else 'OMP_WAIT_POLICY=PASSIVE'}.",
        "",
        *command_block(report["command"]),
        "",
        "| seed | wall (s) | CPU (s) | training (s) | figures + tables (s) | "
        "load avg before | load avg after |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["studies"]:
        steps = s["steps_s"]
        train = max(v for k, v in steps.items() if k.startswith("train "))
        lines.append(
            f"| {s['seed']} | {s['wall_s']:.1f} | {s['cpu_s']:.0f} | {train} | "
            f"{s['wall_s'] - train:.0f} | {s['load_average_before'][0]:.2f} | "
            f"{s['load_average_after'][0]:.2f} |"
        )
    lines += [
        "",
        "Test accuracy (%) in the last three epochs of each run, and its final value:",
        "",
        "| seed | run | epochs | batch | lr | last three epochs | final |",
        "|---:|---|---:|---:|---:|---|---:|",
    ]
    for s in report["studies"]:
        for r in s["runs"].values():
            lines.append(
                f"| {s['seed']} | {r['label']} | {r['epochs']} | {r['batch_size']} | "
                f"{r['lr']:g} | {_acc(r['test_accuracy'][-3:])} | "
                f"{r['test_accuracy'][-1]:.2f} |"
            )
    lines += [
        "",
        f"Over {len(report['studies'])} seed(s):",
        "",
        f"| run | {'final mean ± std' if len(report['studies']) > 1 else 'final'} | "
        "least of the last three epochs |",
        "|---|---:|---:|",
    ]
    for n in c["norms"].values():
        lines.append(
            f"| {n['label']} | {mean_std(n['final_mean'], n['final_std'], 3)} | "
            f"{n['last3_min']:.2f} |"
        )
    if target is not None and not quick:
        lines += [
            "",
            f"- wall time <= {target['wall_s']:.0f} s in every study: {_yes(c['met']['wall'])}",
            f"- every run >= {target['last3_min']}% in each of its last three epochs: "
            f"{_yes(c['met']['last3'])}",
            f"- each norm's final accuracy averaging >= {target['final_mean_min']}%: "
            f"{_yes(c['met']['final_mean'])}",
        ]
    lines += [
        "",
        f"Training throughput of the first study: {t['training_images']:,} training images in "
        f"{t['training_wall_s']} s of training wall time = "
        f"{t['training_images_per_s']:,.0f} img/s, against a ceiling of "
        f"{t['ceiling_images_per_s']:,.0f} img/s "
        f"({t['flops_per_training_image'] / 1e6:.2f} MFLOP per training image, counted by "
        f"torch's FLOP counter; float32 matrix-multiply peak "
        f"{t['matmul_peak_gflops']:.0f} GFLOP/s on {t['peak_threads']} threads): "
        f"{100 * t['fraction_of_ceiling']:.0f}% of it.",
        "",
        "Step times (s) from the study's log.txt, first study:",
        "",
        "| step | s |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in report["studies"][0]["steps_s"].items()),
        "",
        "The printed table of the first study:",
        "",
        report["studies"][0]["table"].rstrip(),
        "",
    ]
    return "\n".join(lines)


def print_summary(report: dict[str, Any]) -> None:
    for s in report["studies"]:
        accs = ", ".join(
            f"{r['label']} {_acc(r['test_accuracy'][-3:])}" for r in s["runs"].values()
        )
        console.print(f"seed {s['seed']}: {s['wall_s']:.1f} s wall; {accs}", highlight=False)
    met = report["check"]["met"]
    console.print(f"targets met: {met}", highlight=False)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    dataset: Annotated[str, typer.Option(help="mnist or cifar10.")] = "mnist",
    seeds: Annotated[str, typer.Option(help="Comma list; one study per seed.")] = "1",
    data_dir: Annotated[
        Path | None,
        typer.Option(help=f"Data folder. Default: ${DATA_ENV}, else ../shared/data."),
    ] = None,
    keep: Annotated[
        Path | None, typer.Option(help="Keep each study's folder here (<keep>/seed<S>).")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON report here ('-': stdout).")
    ] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown report here.")] = None,
    max_load: Annotated[
        float, typer.Option(help="Before each study, wait for a 1-minute load average this low.")
    ] = 1.5,
    max_wait: Annotated[float, typer.Option(help="... but at most this many seconds.")] = 0.0,
    quick: Annotated[
        bool, typer.Option("--quick", help="Smoke run: tiny generated data, 1 epoch, no verdict.")
    ] = False,
    render: Annotated[
        Path | None,
        typer.Option(help="Train nothing: re-check and re-write the reports of this JSON report."),
    ] = None,
) -> None:
    """Run the study as `make study` does, time it, and check the accuracy criterion."""
    if render is not None:
        report = json.loads(render.read_text())
        report["check"] = check(report["dataset"], report["studies"], report["settings"]["quick"])
        write_reports(report, json_path, markdown)
        return
    if dataset not in ("mnist", "cifar10"):
        raise typer.BadParameter("mnist or cifar10", param_hint="--dataset")
    seed_list = [int(s) for s in seeds.split(",")]
    machine = machine_info()
    extra = ["--epochs", "1"] if quick else []
    studies = []
    with tempfile.TemporaryDirectory(prefix="normcli-tta-") as tmp:
        tmp_path = Path(tmp)
        env = normcli_shim(tmp_path)
        if quick:
            root = write_synthetic(dataset, tmp_path / "data", QUICK_TRAIN, QUICK_TEST)
        else:
            root = data_dir or Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
        for seed in seed_list:
            waited = 0.0 if quick else wait_for_quiet(max_load, max_wait)
            out = (keep or tmp_path / "studies") / f"seed{seed}"
            if out.exists() and any(out.iterdir()):
                raise typer.BadParameter(f"{out} is not empty", param_hint="--keep")
            out.mkdir(parents=True, exist_ok=True)
            console.print(f"study {dataset}, seed {seed} -> {out}", highlight=False)
            study = run_study(dataset, seed, root, out, env, extra)
            study["waited_for_load_s"] = waited
            studies.append(study)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dataset": dataset,
        "machine": machine,
        "settings": {"seeds": seed_list, "quick": quick, "max_load": max_load,
                     "data_dir": "(generated)" if quick else str(root)},  # fmt: skip
        "studies": studies,
        "check": check(dataset, studies, quick),
        "throughput": throughput(dataset, studies[0], os.cpu_count() or 1, 0.2 if quick else 2.0),
    }
    write_reports(report, json_path, markdown)


def write_reports(report: dict[str, Any], json_path: Path | None, markdown: Path | None) -> None:
    print_summary(report)
    if json_path is not None:
        write_text(json_path, json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        write_text(markdown, render_markdown(report))


if __name__ == "__main__":
    app()
