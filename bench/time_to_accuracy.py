"""Time to accuracy: the whole study, as `make study` runs it, timed and checked.

    python bench/time_to_accuracy.py --dataset mnist --seeds 1,2,3 \\
        --json bench/results/time_to_accuracy.json --markdown bench/results/time_to_accuracy.md

Each study is `examples/compare_norms.sh DATASET --data-dir DIR --out FRESH_DIR --seed S`, the
script `make study` runs with this checkout's normcli, timed from nothing trained to the
printed table. The stored histories are then checked: on MNIST every norm (BN + L1, GN, LN) at
>= 99.4% test accuracy in each of its last three epochs, each norm's final accuracy averaging
>= 99.45% over the seeds, and the study's wall time <= 180 s; CIFAR-10 has no target. Each
study records the load before and after and the CPU seconds it used; training images per
second are also given against the ceiling of the machine's float32 matrix-multiply peak.
"""

from __future__ import annotations

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
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from normcli.runtime import configure_threads, describe_spin, spin_count, usable_cores

# normcli's OpenMP wait policy, set here so the report records it and the study's commands
# inherit it; before torch loads (machine imports it), hence the imports below it.
# ruff: noqa: E402
configure_threads()

import machine  # bench/machine.py: a script's folder is on sys.path
import typer

from normcli.checkpoint import read_metadata
from normcli.config import ModelArgs
from normcli.data import DATA_ENV, get_dataset

SCRIPT = machine.REPO / "examples" / "compare_norms.sh"
RUNS = ("bn_l1", "gn", "ln")  # the checkpoints compare_norms.sh writes, in its order
# Per dataset: the study's wall-time target (s), the accuracy every run must hold in each of
# its last three epochs, and the least mean final accuracy over seeds (percent).
TARGETS = {"mnist": {"wall_s": 180.0, "last3_min": 99.4, "final_mean_min": 99.45}}
Study = Enum("Study", {"mnist": "mnist", "cifar10": "cifar10"}, type=str)


def normcli_shim(folder: Path) -> dict[str, str]:
    """An environment whose `normcli` is this checkout run by this Python."""
    shim = folder / "normcli"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m normcli "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    return machine.checkout_env({**env, "PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}"})


def run_study(
    dataset: str, seed: int, data_dir: Path, out: Path, env: dict[str, str], extra: list[str]
) -> dict[str, Any]:
    """One timed study into the empty folder `out`; its runs' histories and step times."""
    cmd = ["bash", str(SCRIPT), dataset, "--data-dir", str(data_dir), "--out", str(out),
           "--seed", str(seed), *extra]  # fmt: skip
    load_before, cpu_before = machine.load_average(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=machine.REPO)
    wall = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"the study failed (exit {result.returncode}):\n{result.stderr}")
    runs = {}
    for name in RUNS:
        meta = read_metadata(out / f"{name}.safetensors")
        t, last = meta.train_args, meta.history[-1]
        # The spin that run chose for itself (normcli.runtime): a --threads run among others.
        count = spin_count(["train", "--threads", str(t.threads)], env, usable_cores())
        own_env = {**env, **({"GOMP_SPINCOUNT": count} if count else {})}
        runs[name] = {
            "label": meta.run.label, "norm": meta.model_args.norm, "epochs": t.epochs,
            "batch_size": t.batch_size, "lr": t.lr, "l1": t.l1, "threads": t.threads,
            # as normcli.tuning chose them, recorded in the checkpoint
            "precision": t.precision, "channels_last": t.channels_last,
            "openmp": describe_spin(own_env),
            "test_accuracy": [row["test_accuracy"] for row in meta.history],
            "train_seconds": sum(row["seconds"] for row in meta.history),
            "train_images_per_epoch": round(last["images_per_second"] * last["seconds"]),
        }  # fmt: skip
    steps = re.findall(r"^(.+): (\d+) s$", (out / "log.txt").read_text(), re.MULTILINE)
    return {
        "seed": seed, "command": shlex.join(cmd), "wall_s": wall,
        "cpu_s": sum(getattr(cpu, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime")),
        "load_average_before": load_before, "load_average_after": machine.load_average(),
        "steps_s": {name: int(s) for name, s in steps}, "table": result.stdout, "runs": runs,
    }  # fmt: skip


def check(dataset: str, studies: list[dict[str, Any]], quick: bool = False) -> dict[str, Any]:
    """Per norm over the seeds: least of the last three epochs, final mean; the verdicts."""
    target = TARGETS.get(dataset)
    norms = {}
    for name in RUNS:
        finals = [s["runs"][name]["test_accuracy"][-1] for s in studies]
        norms[name] = {
            "label": studies[0]["runs"][name]["label"], "final": finals,
            "final_mean": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "last3_min": min(min(s["runs"][name]["test_accuracy"][-3:]) for s in studies),
        }  # fmt: skip
    met: dict[str, Any] = {"wall": None, "last3": None, "final_mean": None}
    if target is not None and not quick:
        met["wall"] = all(s["wall_s"] <= target["wall_s"] for s in studies)
        met["last3"] = all(n["last3_min"] >= target["last3_min"] for n in norms.values())
        met["final_mean"] = all(n["final_mean"] >= target["final_mean_min"] for n in norms.values())
    return {"target": target, "norms": norms, "met": met}


def training_seconds(study: dict[str, Any]) -> int:
    """The study's training wall time: its longest training (the three run at once)."""
    return max(v for k, v in study["steps_s"].items() if k.startswith("train "))


def throughput(dataset: str, study: dict[str, Any], threads: int, seconds: float) -> dict[str, Any]:
    """The study's training images per second against the matrix-multiply ceiling."""
    model = ModelArgs(dataset=dataset).resolve().build()
    c = machine.ceiling(model, get_dataset(dataset).input_shape, (threads,), seconds)
    images = sum(r["epochs"] * r["train_images_per_epoch"] for r in study["runs"].values())
    rate = images / training_seconds(study)
    return {
        "flops_per_training_image": c["flops_per_training_image"],
        "matmul_peak_gflops": c[f"matmul_gflops_{threads}_threads"], "peak_threads": threads,
        "ceiling_images_per_s": c[f"ceiling_images_per_s_{threads}_threads"],
        "training_images": images, "training_wall_s": training_seconds(study),
        "training_images_per_s": rate,
        "fraction_of_ceiling": rate / c[f"ceiling_images_per_s_{threads}_threads"],
    }  # fmt: skip


def _acc(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _how(run: dict[str, Any]) -> str:
    """A run's precision, layout and OpenMP spin ('-' where older reports lack them)."""
    layout = {True: "channels_last", False: "contiguous"}.get(run.get("channels_last"), "-")
    return f"{run.get('precision', '-')}, {layout}, {run.get('openmp', '-')}"


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "NO"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    c, t, studies = report["check"], report["throughput"], report["studies"]
    target, first, table = c["target"], studies[0], machine.table
    seeds = [[s["seed"], f"{s['wall_s']:.1f}", f"{s['cpu_s']:.0f}", training_seconds(s),
              f"{s['wall_s'] - training_seconds(s):.0f}", f"{s['load_average_before'][0]:.2f}",
              f"{s['load_average_after'][0]:.2f}"] for s in studies]  # fmt: skip
    runs = [[s["seed"], r["label"], r["epochs"], r["batch_size"], f"{r['lr']:g}", _how(r),
             _acc(r["test_accuracy"][-3:]), f"{r['test_accuracy'][-1]:.2f}"]
            for s in studies for r in s["runs"].values()]  # fmt: skip
    spread = [[n["label"], machine.mean_std(n["final_mean"], n["final_std"], 3),
               f"{n['last3_min']:.2f}"] for n in c["norms"].values()]  # fmt: skip
    verdicts = [] if target is None or report["settings"]["quick"] else [
        f"- wall time <= {target['wall_s']:.0f} s in every study: {_yes(c['met']['wall'])}",
        f"- every run >= {target['last3_min']}% in each of its last three epochs: "
        f"{_yes(c['met']['last3'])}",
        f"- each norm's final accuracy averaging >= {target['final_mean_min']}%: "
        f"{_yes(c['met']['final_mean'])}", "",
    ]  # fmt: skip
    body = [
        f"Each training runs on {first['runs']['gn']['threads']} thread(s), the three at once.", "",
        *table(["seed", "wall (s)", "CPU (s)", "training (s)", "figures + tables (s)",
                "load avg before", "load avg after"], seeds),
        "Test accuracy (%) in the last three epochs of each run, and its final value:", "",
        *table(["seed", "run", "epochs", "batch", "lr", "precision, layout, OpenMP",
                "last three epochs", "final"], runs),
        f"Over {len(studies)} seed(s):", "",
        *table(["run", "final mean ± std", "least of the last three epochs"], spread),
        *verdicts,
        f"Training throughput of the first study: {t['training_images']:,} training images in "
        f"{t['training_wall_s']} s of training wall time = {t['training_images_per_s']:,.0f} "
        f"img/s, against a ceiling of {t['ceiling_images_per_s']:,.0f} img/s "
        f"({t['flops_per_training_image'] / 1e6:.2f} MFLOP per training image, counted by "
        f"torch's FLOP counter; float32 matrix-multiply peak {t['matmul_peak_gflops']:.0f} "
        f"GFLOP/s on {t['peak_threads']} threads): {100 * t['fraction_of_ceiling']:.0f}% of it.",
        "", "Step times (s) from the study's log.txt, first study:", "",
        *table(["step", "s"], [list(kv) for kv in first["steps_s"].items()]),
        "The printed table of the first study:", "", first["table"].rstrip(), "",
    ]  # fmt: skip
    title = f"Time to accuracy: `make study DATASET={report['dataset']}`"
    return machine.page(report, __doc__, *body, title=title)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    dataset: Annotated[Study, typer.Option(help="The study's dataset.")] = Study.mnist,  # type: ignore[attr-defined]
    seeds: Annotated[str, typer.Option(help="Comma list; one study per seed.")] = "1",
    keep: Annotated[Path | None, typer.Option(help="Keep each study in <keep>/seed<S>.")] = None,
    max_load: Annotated[float, typer.Option(help="Wait for a 1-min load this low...")] = 1.5,
    max_wait: Annotated[float, typer.Option(help="... but at most this many seconds.")] = 0.0,
    render: Annotated[Path | None, typer.Option(help="Re-check and re-write this report.")] = None,
    data_dir: machine.DataDirOpt = None,
    json_path: machine.JsonOpt = None,
    markdown: machine.MarkdownOpt = None,
    quick: machine.QuickOpt = False,
) -> None:
    """Run the study as `make study` does, time it, and check the accuracy criterion."""
    if render is not None:
        report = json.loads(render.read_text())
        report["check"] = check(report["dataset"], report["studies"], report["settings"]["quick"])
    else:
        settings = {"seeds": [int(s) for s in seeds.split(",")], "quick": quick,
                    "max_load": max_load, "max_wait": max_wait}  # fmt: skip
        report = machine.new_report(dataset=dataset.value, settings=settings)
        with tempfile.TemporaryDirectory(prefix="normcli-tta-") as tmp:
            root = machine.data_root(data_dir, quick, Path(tmp), (dataset.value,))
            settings["data_dir"] = "(generated)" if quick else str(root)
            env, out = normcli_shim(Path(tmp)), keep or Path(tmp) / "studies"
            report["studies"] = studies = run_studies(dataset.value, root, out, env, settings)
        report["load_average_after"] = machine.load_average()
        report["check"] = check(dataset.value, studies, quick)
        peak_s, threads = 0.2 if quick else 2.0, os.cpu_count() or 1
        report["throughput"] = throughput(dataset.value, studies[0], threads, peak_s)
    print(render_markdown(report), file=sys.stderr)
    machine.write_reports(report, json_path, markdown, render_markdown)


def run_studies(
    dataset: str, root: Path, keep: Path, env: dict[str, str], settings: dict[str, Any]
) -> list[dict]:
    """One study per seed, each into <keep>/seed<S> once the machine is quiet enough."""
    studies = []
    for seed in settings["seeds"]:
        quick, limits = settings["quick"], (settings["max_load"], settings["max_wait"])
        waited = 0.0 if quick else machine.wait_for_quiet(*limits)
        out = keep / f"seed{seed}"
        if out.exists() and any(out.iterdir()):
            raise typer.BadParameter(f"{out} is not empty", param_hint="--keep")
        out.mkdir(parents=True, exist_ok=True)
        print(f"study {dataset}, seed {seed} -> {out}", file=sys.stderr)
        extra = ["--epochs", "1"] if quick else []
        studies.append(run_study(dataset, seed, root, out, env, extra))
        studies[-1]["waited_for_load_s"] = waited
    return studies


if __name__ == "__main__":
    machine.run_app(app)
