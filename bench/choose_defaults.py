"""Choosing MNIST's training defaults on a validation split, then checking them.

    # train: the study's three runs (BN + L1, GN, LN) per seed, 5,000 training images held out
    python bench/choose_defaults.py train --epochs 12 --seeds 1,2,3 --out runs/val/e12_affine
    python bench/choose_defaults.py train --epochs 10 --augment translate --out runs/val/e10_tr
    # the criterion per folder and norm, on the validation split (or the test set, --on test)
    python bench/choose_defaults.py summarize runs/val/* --markdown bench/results/defaults_val.md

Each run is `normcli train --norm N --seed S --epochs E --batch-size B --lr LR --val 5000
--threads 1` (`--l1 1e-4` for BN), through the library in a process of its own, `--jobs` at a
time; `--augment` swaps the dataset's augmentation for one of AUGMENTS in that process only,
which is how cheaper augmentations were tried. The criterion is the study's: every run at
>= 99.4% in each of its last three epochs, and each norm's final accuracy averaging >= 99.45%
over at least 3 seeds. One failing seed rejects a recipe; fewer seeds without a failure leave
it open.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import machine  # bench/machine.py: a script's folder is on sys.path
import typer

from normcli import data
from normcli.checkpoint import read_metadata

RUNS = {"bn": 1e-4, "gn": 0.0, "ln": 0.0}  # norm -> the study's L1 lambda
AUGMENTS = {
    "affine": data.MNIST.augment,  # the record's own: rotation + sub-pixel shift
    "translate": data.Augment(crop_padding=2),  # whole-pixel shift, cropped from a padded batch
    "none": data.Augment(),
}
LAST3_MIN, FINAL_MEAN_MIN, MIN_SEEDS = 99.4, 99.45, 3

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def one(
    norm: str, seed: int, epochs: int, batch_size: int, lr: float, augment: str, val: int,
    ema: float, label_smoothing: float, out: Path, data_dir: Path,
) -> None:  # fmt: skip
    """One run (used by `train`); an interrupted one continues from its checkpoint."""
    from normcli.config import RunSpec
    from normcli.train import resume_training, train

    data.DATASETS["mnist"] = dataclasses.replace(data.MNIST, augment=AUGMENTS[augment])
    if out.exists():
        resume_training(out, data_dir=data_dir, device="cpu")
        return
    spec = RunSpec.from_options(
        dataset="mnist", norm=norm, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
        l1=RUNS[norm], val=val, ema=ema, label_smoothing=label_smoothing, threads=1,
    )  # fmt: skip
    train(spec, data_dir=data_dir, device="cpu", out=out, overwrite=True)


@app.command("train")
def train_runs(
    out: Annotated[Path, typer.Option(help="Folder for the checkpoints <norm>_s<seed>.")],
    epochs: Annotated[int, typer.Option()] = 15,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float, typer.Option()] = 0.05,
    augment: Annotated[str, typer.Option(help=", ".join(AUGMENTS))] = "affine",
    seeds: Annotated[str, typer.Option()] = "1,2,3",
    norms: Annotated[str, typer.Option()] = "bn,gn,ln",
    val: Annotated[int, typer.Option(help="Held-out training images.")] = 5000,
    ema: Annotated[float, typer.Option(help="Decay of the weights' moving average; 0: off.")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing; 0: off.")] = 0.0,
    jobs: Annotated[int, typer.Option(help="Runs at a time (one thread each).")] = 2,
    data_dir: machine.DataDirOpt = None,
) -> None:
    """Train the study's runs for every seed; runs whose checkpoint is complete are kept."""
    if augment not in AUGMENTS:
        raise typer.BadParameter(f"one of {', '.join(AUGMENTS)}", param_hint="--augment")
    out.mkdir(parents=True, exist_ok=True)
    root = machine.data_root(data_dir)
    env = machine.checkout_env({**os.environ, "OMP_NUM_THREADS": "1"})
    todo = []
    for seed in (int(s) for s in seeds.split(",")):
        for norm in norms.split(","):
            path = out / f"{norm}_s{seed}.safetensors"
            if not path.exists() or len(read_metadata(path).history) != epochs:
                args = [norm, seed, epochs, batch_size, lr, augment, val, ema, label_smoothing,
                        path, root]  # fmt: skip
                todo.append([sys.executable, __file__, "one", *map(str, args)])

    def run(cmd: list[str]) -> int:
        return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode

    with ThreadPoolExecutor(jobs) as pool:
        if any(list(pool.map(run, todo))):
            raise typer.Exit(1)


def verdict(last3_least: list[float], finals: list[float]) -> str:
    """'no' once a seed fails; 'yes' from MIN_SEEDS seeds on; else 'open'."""
    if min(last3_least) < LAST3_MIN:
        return "no"
    if len(finals) < MIN_SEEDS:
        return f"open ({len(finals)} seed{'s' * (len(finals) > 1)})"
    return "yes" if statistics.mean(finals) >= FINAL_MEAN_MIN else "no"


def folder_rows(folder: Path, on: str) -> list[dict]:
    """Per norm in `folder`: the seeds, each run's last three and final accuracies on `on`."""
    key, by_norm, recipe = f"{on}_accuracy", {}, None
    for path in sorted(folder.glob("*.safetensors")):
        meta = read_metadata(path)
        t = meta.train_args
        if len(meta.history) < t.epochs or key not in meta.history[-1]:
            continue  # unfinished, or no validation split
        recipe = f"{t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}"
        accs = [row[key] for row in meta.history]
        by_norm.setdefault(meta.model_args.norm, []).append((t.seed, accs))
    rows = []
    for norm, runs in ((n, sorted(by_norm[n])) for n in RUNS if n in by_norm):
        finals, last3 = [a[-1] for _, a in runs], [min(a[-3:]) for _, a in runs]
        rows.append({
            "folder": folder.name, "recipe": recipe, "norm": norm, "seeds": [s for s, _ in runs],
            "last3": [a[-3:] for _, a in runs], "last3_min": min(last3),
            "final_mean": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "meets": verdict(last3, finals),
        })  # fmt: skip
    return rows


@app.command()
def summarize(
    folders: list[Path],
    on: Annotated[str, typer.Option(help="val or test.")] = "val",
    json_path: machine.JsonOpt = None,
    markdown: machine.MarkdownOpt = None,
) -> None:
    """The criterion per folder and norm, on the validation split or the test set."""
    rows = [row for folder in folders for row in folder_rows(folder, on)]
    report = machine.new_report(settings={"on": on}, rows=rows)
    del report["load_average_before"]  # a summary of earlier runs: no load of its own
    machine.write_reports(report, json_path, markdown, render_markdown)
    print(render_markdown(report), file=sys.stderr)


def render_markdown(report: dict) -> str:
    """The summary as a Markdown page: one row per folder and norm."""
    on = report["settings"]["on"]
    cells = [[r["folder"], r["recipe"], r["norm"], ",".join(map(str, r["seeds"])),
              "; ".join(" / ".join(f"{v:.2f}" for v in a) for a in r["last3"]),
              f"{r['last3_min']:.2f}", machine.mean_std(r["final_mean"], r["final_std"], 2),
              r["meets"]] for r in report["rows"]]  # fmt: skip
    columns = ["folder", "recipe", "run", "seeds", f"{on} acc, last three epochs per seed",
               "least", "final mean ± std", "meets"]  # fmt: skip
    held_out = " (5,000 training images held out; the test set untouched)" * (on == "val")
    return machine.page(report, __doc__, f"Accuracy on the {on} split{held_out}.", "",
                        *machine.table(columns, cells),
                        title="Choosing MNIST's epochs on the validation split")  # fmt: skip


if __name__ == "__main__":
    machine.run_app(app)
