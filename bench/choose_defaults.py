"""Choosing MNIST's training defaults on a validation split, then checking them.

    # train: the study's three runs (BN + L1, GN, LN) per seed, 5,000 training images held out
    python bench/choose_defaults.py train --epochs 12 --seeds 1,2,3 --out runs/val/e12_affine
    python bench/choose_defaults.py train --epochs 10 --augment translate --out runs/val/e10_tr
    # the criterion per folder and norm, on the validation split (or the test set, --on test)
    python bench/choose_defaults.py summarize runs/val/* --markdown bench/results/defaults_val.md

Each run is `normcli train --norm N --seed S --epochs E --batch-size B --lr LR --val 5000
--threads 1` (`--l1 1e-4` for BN), run through the library's seam in its own process, `--jobs`
at a time; `--augment` swaps the dataset's augmentation for one of AUGMENTS (the record is
replaced in that process only), which is how the cheaper augmentation was tried before it
was chosen or dropped.

The criterion is the study's: every run at >= 99.4% in each of its last three epochs, and
each norm's final accuracy averaging >= 99.45% over the seeds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import typer
from machine import checkout_env, mean_std, write_text

from normcli import data
from normcli.checkpoint import read_metadata

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
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
    out: Path, data_dir: Path,
) -> None:  # fmt: skip
    """One run (used by `train`); an interrupted one continues from its checkpoint."""
    from normcli.config import RunSpec
    from normcli.train import resume_training, train

    mnist = data.DATASETS["mnist"]
    data.DATASETS["mnist"] = dataclasses.replace(mnist, augment=AUGMENTS[augment])
    if out.exists():
        resume_training(out, data_dir=data_dir, device="cpu")
        return
    spec = RunSpec.from_options(
        dataset="mnist", norm=norm, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
        l1=RUNS[norm], val=val, threads=1,
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
    jobs: Annotated[int, typer.Option(help="Runs at a time (one thread each).")] = 2,
    data_dir: Annotated[Path, typer.Option()] = DEFAULT_DATA_DIR,
) -> None:
    """Train the study's runs for every seed; runs whose checkpoint is complete are kept."""
    if augment not in AUGMENTS:
        raise typer.BadParameter(f"one of {', '.join(AUGMENTS)}", param_hint="--augment")
    out.mkdir(parents=True, exist_ok=True)
    env = checkout_env({**os.environ, "OMP_NUM_THREADS": "1"})
    todo = []
    for seed in (int(s) for s in seeds.split(",")):
        for norm in norms.split(","):
            path = out / f"{norm}_s{seed}.safetensors"
            if path.exists() and len(read_metadata(path).history) == epochs:
                continue
            args = [norm, seed, epochs, batch_size, lr, augment, val, path, data_dir]
            todo.append([sys.executable, __file__, "one", *map(str, args)])

    def run(cmd: list[str]) -> int:
        return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(run, todo))
    if any(codes):
        raise typer.Exit(1)


def verdict(last3_least: list[float], finals: list[float]) -> str:
    """'no' as soon as one seed fails the criterion; 'yes' only with MIN_SEEDS seeds or more;
    otherwise 'open' (no failure yet, too few seeds to accept)."""
    if min(last3_least) < LAST3_MIN:
        return "no"
    if len(finals) < MIN_SEEDS:
        return f"open ({len(finals)} seed{'s' * (len(finals) > 1)})"
    return "yes" if statistics.mean(finals) >= FINAL_MEAN_MIN else "no"


def folder_rows(folder: Path, on: str) -> list[dict]:
    """Per norm in `folder`: the seeds, each run's last three and final accuracies on `on`."""
    key = f"{on}_accuracy"
    by_norm: dict[str, list] = {}
    recipe = None
    for path in sorted(folder.glob("*.safetensors")):
        meta = read_metadata(path)
        if len(meta.history) < meta.train_args.epochs or key not in meta.history[-1]:
            continue  # unfinished, or no validation split
        t = meta.train_args
        recipe = f"{t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}"
        accs = [row[key] for row in meta.history]
        by_norm.setdefault(meta.model_args.norm, []).append((t.seed, accs))
    rows = []
    for norm in RUNS:
        runs = sorted(by_norm.get(norm, []))
        if not runs:
            continue
        finals = [a[-1] for _, a in runs]
        last3 = [min(a[-3:]) for _, a in runs]
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
    markdown: Annotated[Path | None, typer.Option()] = None,
    json_path: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """The criterion per folder and norm, on the validation split or the test set."""
    rows = [row for folder in folders for row in folder_rows(folder, on)]
    lines = [
        "# Choosing MNIST's epochs on the validation split",
        "",
        f"Written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by",
        "",
        "```",
        shlex.join(["python", *sys.argv]),
        "```",
        "",
        f"Each run: `normcli train --dataset mnist --val 5000 --threads 1` with the folder's "
        f"recipe (BN with `--l1 1e-4`); accuracy on the {on} split"
        + (" (5,000 training images held out; the test set untouched)" if on == "val" else "")
        + f". Criterion (the study's): every run >= {LAST3_MIN}% in each of its last three "
        f"epochs and each norm's final accuracy averaging >= {FINAL_MEAN_MIN}% over at least "
        f"{MIN_SEEDS} seeds. One failing seed rejects a recipe; fewer seeds without a failure "
        "leave it open.",
        "",
        f"| folder | recipe | run | seeds | {on} acc, last three epochs per seed | least | "
        "final mean ± std | meets |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        last3 = "; ".join(" / ".join(f"{v:.2f}" for v in a) for a in r["last3"])
        lines.append(
            f"| {r['folder']} | {r['recipe']} | {r['norm']} | {','.join(map(str, r['seeds']))} | "
            f"{last3} | {r['last3_min']:.2f} | {mean_std(r['final_mean'], r['final_std'], 2)} | "
            f"{r['meets']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown is not None:
        write_text(markdown, text)
    if json_path is not None:
        write_text(json_path, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    app()
