"""Choosing MNIST's training defaults on a validation split, then checking them.

    # train: the study's three runs (BN + L1, GN, LN) per seed, 5,000 training images held out
    python bench/choose_defaults.py train --epochs 12 --seeds 1,2,3 --out runs/val/e12_affine
    python bench/choose_defaults.py train --epochs 10 --augment translate --out runs/val/e10_tr
    python bench/choose_defaults.py train --epochs 6 --ema 0.999 --out runs/val/e6_ema  # a trick
    # the criterion per folder and norm, on the validation split (or the test set, --on test);
    # --reference F (repeatable): each folder against folder F, seed by seed; --tta: TTA too
    python bench/choose_defaults.py summarize runs/val/* --markdown bench/results/defaults_val.md
    python bench/choose_defaults.py summarize runs/val/e15 runs/val/e6* --reference e15 --tta

Each run is `normcli train --norm N --seed S --epochs E --batch-size B --lr LR --val 5000
--threads 1` (`--l1 1e-4` for BN), through the library in a process of its own, `--jobs` at a
time; `--augment` swaps the dataset's augmentation for one of AUGMENTS in that process only,
which is how cheaper augmentations were tried; `--ema` and `--label-smoothing` are the run
options of those names. The criterion is the study's: every run at >= 99.4% in each of its
last three epochs, and each norm's final accuracy averaging >= 99.45% over at least 3 seeds.
One failing seed rejects a recipe; fewer seeds without a failure leave it open.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import machine  # bench/machine.py: a script's folder is on sys.path
import typer

from normcli import data
from normcli.checkpoint import read_metadata
from normcli.stats import mean_interval

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


def recipe_text(t: Any) -> str:
    """A run's training recipe in words, its optional tricks included."""
    parts = [f"{t.epochs} epochs", f"batch {t.batch_size}", f"lr {t.lr:g}"]
    if t.ema:
        parts.append(f"EMA {t.ema:g}")
    if t.label_smoothing:
        parts.append(f"label smoothing {t.label_smoothing:g}")
    return ", ".join(parts)


@functools.cache
def whole_split(name: str, train: bool, data_dir: Path | None) -> data.Split:
    """A dataset's whole training or test split, read once per summary."""
    return data.load_split(name, train, machine.data_root(data_dir))


def tta_accuracy(path: Path, on: str, data_dir: Path | None) -> float:
    """The final weights' accuracy (%) on `on` (the run's own held-out images, or the test set)
    under test-time augmentation (normcli.tta): its own protocol, beside the plain number."""
    from normcli import tta
    from normcli.checkpoint import load_checkpoint
    from normcli.run import hold_out

    ckpt = load_checkpoint(path)
    t, name = ckpt.meta.train_args, ckpt.meta.model_args.dataset
    split = whole_split(name, on != "test", data_dir)
    if on == "val":
        split = hold_out(split, t.val, t.seed)[1]
    return tta.evaluate_tta(ckpt.model, split, data.get_dataset(name)).accuracy


def folder_rows(
    folder: Path, on: str, tta: bool = False, data_dir: Path | None = None
) -> list[dict]:
    """Per norm in `folder`: the seeds, each run's last three and final accuracies on `on`, and
    with `tta` the final weights' TTA accuracies (the data read from `data_dir`)."""
    key, by_norm, recipe = f"{on}_accuracy", {}, None
    for path in sorted(folder.glob("*.safetensors")):
        meta = read_metadata(path)
        t = meta.train_args
        if len(meta.history) < t.epochs or key not in meta.history[-1]:
            continue  # unfinished, or no validation split
        recipe = recipe_text(t)
        accs = [row[key] for row in meta.history]
        with_tta = tta_accuracy(path, on, data_dir) if tta else None
        by_norm.setdefault(meta.model_args.norm, []).append((t.seed, accs, with_tta))
    rows = []
    for norm, runs in ((n, sorted(by_norm[n])) for n in RUNS if n in by_norm):
        finals, last3 = [a[-1] for _, a, _ in runs], [min(a[-3:]) for _, a, _ in runs]
        rows.append({
            "folder": folder.name, "recipe": recipe, "norm": norm, "seeds": [s for s, *_ in runs],
            "last3": [a[-3:] for _, a, _ in runs], "last3_min": min(last3), "finals": finals,
            "final_mean": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "meets": verdict(last3, finals),
            "tta_finals": [v for *_, v in runs] if tta else None,
        })  # fmt: skip
    return rows


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """mean(a - b) over the seeds both have, with the paired t 95% interval (the same seed
    holds out the same images and starts from the same weights, so the pairs share noise)."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not diffs:
        return None
    mean = statistics.mean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else None
    return {"n": len(diffs), "mean": mean, "interval": mean_interval(mean, std, len(diffs))}


def compare(rows: list[dict], references: list[str]) -> None:
    """Add to each row its TTA gain (TTA minus plain, paired) and, per folder named in
    `references`, its final accuracy minus that folder's for the same norm and seeds (paired)."""
    for row in rows:
        finals = dict(zip(row["seeds"], row["finals"], strict=True))
        if row["tta_finals"] is not None:
            tta = dict(zip(row["seeds"], row["tta_finals"], strict=True))
            row["tta_gain"] = paired(tta, finals)
        row["vs"] = {}
        for ref in (r for r in rows if r["folder"] in references and r["norm"] == row["norm"]):
            if ref["folder"] != row["folder"]:
                base = dict(zip(ref["seeds"], ref["finals"], strict=True))
                row["vs"][ref["folder"]] = paired(finals, base)


@app.command()
def summarize(
    folders: list[Path],
    on: Annotated[str, typer.Option(help="val or test.")] = "val",
    reference: Annotated[
        list[str] | None, typer.Option(help="Folder (name) to compare with; repeatable.")
    ] = None,
    tta: Annotated[bool, typer.Option(help="Also evaluate the final weights with TTA.")] = False,
    data_dir: machine.DataDirOpt = None,
    json_path: machine.JsonOpt = None,
    markdown: machine.MarkdownOpt = None,
) -> None:
    """The criterion per folder and norm, on the validation split or the test set."""
    reference = reference or []
    missing = sorted(set(reference) - {f.name for f in folders})
    if missing:
        message = f"not among the folders: {', '.join(missing)}"
        raise typer.BadParameter(message, param_hint="--reference")
    rows = [row for folder in folders for row in folder_rows(folder, on, tta, data_dir)]
    compare(rows, reference)
    settings = {"on": on, "reference": reference, "tta": tta}
    report = machine.new_report(settings=settings, rows=rows)
    del report["load_average_before"]  # a summary of earlier runs: no load of its own
    machine.write_reports(report, json_path, markdown, render_markdown)
    print(render_markdown(report), file=sys.stderr)


def difference_text(d: dict | None) -> str:
    """A paired difference as '+0.12 [-0.03, +0.27] (n 5)', or '' where there is none."""
    if d is None:
        return ""
    ci = "" if d["interval"] is None else " [{:+.2f}, {:+.2f}]".format(*d["interval"])
    return f"{d['mean']:+.2f}{ci} (n {d['n']})"


def render_markdown(report: dict) -> str:
    """The summary as a Markdown page: one row per folder and norm."""
    on, settings = report["settings"]["on"], report["settings"]
    references = settings.get("reference") or []  # absent from summaries written before it
    columns = ["folder", "recipe", "run", "seeds", f"{on} acc, last three epochs per seed",
               "least", "final mean ± std", "meets"]  # fmt: skip
    if settings.get("tta"):
        columns += ["TTA final mean ± std", "TTA − plain (paired)"]
    columns += [f"final − {name} (paired)" for name in references]
    cells = []
    for r in report["rows"]:
        row = [r["folder"], r["recipe"], r["norm"], ",".join(map(str, r["seeds"])),
               "; ".join(" / ".join(f"{v:.2f}" for v in a) for a in r["last3"]),
               f"{r['last3_min']:.2f}", machine.mean_std(r["final_mean"], r["final_std"], 2),
               r["meets"]]  # fmt: skip
        if settings.get("tta"):
            t = r["tta_finals"]
            std = statistics.stdev(t) if len(t) > 1 else None
            row += [machine.mean_std(statistics.mean(t), std, 2), difference_text(r["tta_gain"])]
        row += [difference_text(r["vs"].get(name)) for name in references]
        cells.append(row)
    held_out = " (5,000 training images held out; the test set untouched)" * (on == "val")
    return machine.page(report, __doc__, f"Accuracy on the {on} split{held_out}.", "",
                        *machine.table(columns, cells),
                        title="Choosing MNIST's recipe on the validation split")  # fmt: skip


if __name__ == "__main__":
    machine.run_app(app)
