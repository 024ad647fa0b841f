"""The levers on MNIST training time, each measured on its own, A/B alternated in one run.

    python bench/levers.py --json bench/results/levers.json --markdown bench/results/levers.md
    python bench/levers.py --lever layout --lever augment     # some of them
    python bench/levers.py --quick                            # smoke run: tiny data, 1 round

Every in-process figure times normcli's own training step (`normcli.train.new_run` and
`train_epoch` on the first --images training images: batches sliced from memory, the dataset's
augmentation, SGD + one-cycle, L1 for BN as the study trains it), with the variants measured
alternately, round after round, and the median of the per-round ratios reported: slow drifts
of a shared machine cancel, and each round's numbers are kept. These in-process levers run on
one thread and are timed by that thread's CPU time (time.thread_time): on a shared machine a
variant is then not charged for the time other processes held the core (what remains is their
effect on the shared caches). Wall time is what the thread-policy lever and the compile time
measure.

Levers:
- threads: one run on one thread; one run on two threads and two such runs at once (more
  threads than cores), under OpenMP's wait policies (passive: idle threads sleep at once;
  default spin; short spin, GOMP_SPINCOUNT=10000); the study's three runs on one thread each
  at once; and the three one after another on two threads each (how the study ran before):
  total training images per second, each run in its own process. The worker sets no
  policy of its own: each variant's environment is the policy (normcli's own default,
  GOMP_SPINCOUNT=1000, is measured through `normcli train` by bench/threads_per_run.sh).
- augment: the augmentation's cost per image against the whole training step: MNIST's
  rotation + sub-pixel shift with its sampling grid from F.affine_grid (before) and built
  separably (now), a whole-pixel translation cropped from a zero-padded batch, none.
- layout: channels_last against contiguous, per norm, on one thread.
- batch: the step's cost per image at batch 32 to 256, per norm.
- eval: one evaluation of the test split against one training epoch.
- compile: torch.compile's compile time and its steady-state step time against eager, per norm.
- bf16: bfloat16 autocast against float32, per norm.
- peak: the float32 matrix-multiply peak on 1 and 2 threads, FLOPs per training image, and
  the ceiling that makes.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from machine import (
    checkout_env,
    describe,
    load_average,
    machine_info,
    matmul_peak_gflops,
    smoke_banner,
    training_flops_per_image,
)
from rich.console import Console

from normcli.config import RunSpec
from normcli.data import DATA_ENV, Augment, Split, load_split, write_synthetic
from normcli.evaluate import evaluate
from normcli.train import Run, new_run, train_epoch, use_threads

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
CPU = torch.device("cpu")
NORMS = ("bn", "gn", "ln")
L1 = {"bn": 1e-4}  # the study's BN + L1
LEVERS = ("threads", "augment", "layout", "batch", "eval", "compile", "bf16", "peak")


class AffineGridRotation:
    """MNIST's augmentation as it was built before: the same draws and transformation, the
    sampling grid from F.affine_grid (a batched matrix product over every pixel)."""

    active = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator, part: Any = None) -> Any:
        n, _, h, w = x.shape  # one process: `part` (a share of a larger batch) is None
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(7.0)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2.0
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0] * 2 / w], 1),
                             torch.stack([sin, cos, shift[:, 1] * 2 / h], 1)], 1)  # fmt: skip
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


AUGMENTS: dict[str, Any] = {
    "rotate+shift, F.affine_grid (before)": AffineGridRotation(),
    "rotate+shift, separable grid (now)": Augment(degrees=7.0, shift=2.0),
    "translate (crop, whole pixels)": Augment(crop_padding=2),
    "none": Augment(),
}

console = Console(stderr=True)


# ---------------------------------------------------------------------------
# Timing normcli's training step
# ---------------------------------------------------------------------------


def make_run(
    norm: str, train: Split, test: Split, *, batch_size: int = 64, channels_last: bool | None = None
) -> Run:
    """A fresh seeded run of the study's recipe for `norm` on `train` (an epoch = all of it)."""
    options: dict[str, Any] = {
        "dataset": "mnist", "norm": norm, "batch_size": batch_size, "l1": L1.get(norm, 0.0),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    if channels_last is not None:
        options["channels_last"] = channels_last
    return new_run(RunSpec.from_options(**options).resolve(), train, test, CPU)


def timed_epoch(run: Run, context: AbstractContextManager | None = None) -> float:
    """CPU seconds of this thread for one `train_epoch` of `run` (one torch thread: all of
    the work runs on it)."""
    gc.collect()
    with context or nullcontext():
        start = time.thread_time()
        train_epoch(run)
        return time.thread_time() - start


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each variant once per round, in order, `rounds` times; their results per round."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            out[name].append(fn())
    return out


def alternate_epochs(
    runs: dict[str, Run], rounds: int, contexts: dict[str, Callable[[], Any]] | None = None
) -> dict[str, list[float]]:
    """One timed epoch of each run per round, in order; `contexts` (by name) make a context
    manager to run that variant's epochs in."""
    contexts = contexts or {}
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            make = contexts.get(name)
            out[name].append(timed_epoch(run, make() if make else None))
    return out


def ratio_summary(seconds: dict[str, list[float]], base: str, images: int) -> dict[str, Any]:
    """Per variant: median us per image, and the median per-round speed-up over `base`."""
    rows = {}
    for name, values in seconds.items():
        ratios = [b / v for b, v in zip(seconds[base], values, strict=True)]
        rows[name] = {
            "us_per_image": 1e6 * statistics.median(values) / images,
            "images_per_s": images / statistics.median(values),
            "speedup_vs_" + base.split(" ")[0]: statistics.median(ratios),
            "rounds_s": values,
        }
    return rows


# ---------------------------------------------------------------------------
# The levers
# ---------------------------------------------------------------------------


def lever_augment(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """Each augmentation timed alone on batches of 64, and the whole training step with it
    (BN + L1, one thread): its share of the step."""
    images = len(train)
    runs = {name: make_run("bn", train, test) for name in AUGMENTS}
    for name, aug in AUGMENTS.items():
        runs[name].augment = aug
    rows = ratio_summary(alternate_epochs(runs, rounds), "none", images)
    x = train.images[:64].float() / 255
    alone: dict[str, list[float]] = {name: [] for name in AUGMENTS}
    for _ in range(rounds):
        for name, aug in AUGMENTS.items():
            generator = torch.Generator().manual_seed(0)
            start = time.thread_time()
            for _ in range(50):
                aug(x, generator)
            alone[name].append(1e6 * (time.thread_time() - start) / (50 * len(x)))
    for name, row in rows.items():
        row["augment_us_per_image"] = statistics.median(alone[name])
        row["share_of_step"] = row["augment_us_per_image"] / row["us_per_image"]
    return {"norm": "bn", "threads": 1, "images": images, "rows": rows}


def lever_layout(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """channels_last against contiguous, per norm, one thread, batch 64."""
    out = {}
    for norm in NORMS:
        runs = {
            "channels_last": make_run(norm, train, test, channels_last=True),
            "contiguous": make_run(norm, train, test, channels_last=False),
        }
        out[norm] = ratio_summary(alternate_epochs(runs, rounds), "channels_last", len(train))
    return {"threads": 1, "batch_size": 64, "images": len(train), "norms": out}


def lever_batch(train: Split, test: Split, rounds: int, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Cost per image of the training step at several batch sizes, per norm, one thread."""
    out = {}
    for norm in NORMS:
        runs = {f"batch {b}": make_run(norm, train, test, batch_size=b) for b in sizes}
        seconds = alternate_epochs(runs, rounds)
        out[norm] = ratio_summary(seconds, f"batch {sizes[0]}", len(train))
    return {"threads": 1, "images": len(train), "norms": out}


def lever_eval(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """One evaluation of the test split against one training epoch (same images count scaled
    to a full MNIST epoch), per norm, one thread."""
    out = {}
    for norm in NORMS:
        run = make_run(norm, train, test)
        train_s, eval_s = [], []
        for _ in range(rounds):
            train_s.append(timed_epoch(run))
            gc.collect()
            start = time.thread_time()
            evaluate(run.model, test, run.dataset)
            eval_s.append(time.thread_time() - start)
        train_us = 1e6 * statistics.median(train_s) / len(train)
        eval_us = 1e6 * statistics.median(eval_s) / len(test)
        # Per epoch of the real data: 60,000 training images, 10,000 test images.
        share = 10_000 * eval_us / (60_000 * train_us + 10_000 * eval_us)
        out[norm] = {"train_us_per_image": train_us, "eval_us_per_image": eval_us,
                     "eval_share_of_full_epoch": share, "rounds_train_s": train_s,
                     "rounds_eval_s": eval_s}  # fmt: skip
    return {"threads": 1, "norms": out}


def lever_compile(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """torch.compile (inductor): compile time, then steady-state epochs against eager."""
    out = {}
    for norm in NORMS:
        eager = make_run(norm, train, test)
        compiled = make_run(norm, train, test)
        compiled.model = torch.compile(compiled.model)
        start = time.perf_counter()  # wall: inductor compiles in worker processes too
        timed_epoch(compiled)  # compiles (forward and backward) in its first steps
        first = time.perf_counter() - start
        seconds = alternate_epochs({"eager": eager, "compiled": compiled}, rounds)
        row = ratio_summary(seconds, "eager", len(train))
        row["compiled"]["first_epoch_wall_s"] = first
        row["compiled"]["compile_s"] = first - statistics.median(seconds["compiled"])
        out[norm] = row
        torch._dynamo.reset()  # noqa: SLF001 - the next norm compiles from scratch
    return {"threads": 1, "images": len(train), "norms": out}


def lever_bf16(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """bfloat16 autocast against float32, per norm, one thread."""
    out = {}
    for norm in NORMS:
        runs = {name: make_run(norm, train, test) for name in ("float32", "bf16 autocast")}
        bf16 = {"bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
        seconds = alternate_epochs(runs, rounds, bf16)
        out[norm] = ratio_summary(seconds, "float32", len(train))
    return {"threads": 1, "images": len(train), "norms": out}


def lever_peak(seconds: float = 2.0) -> dict[str, Any]:
    """Matrix-multiply peak on 1 and 2 threads; FLOPs per training image; the ceilings."""
    model = make_run("bn", synthetic_mnist(64), synthetic_mnist(8)).model
    flops = training_flops_per_image(model, (1, 28, 28))
    out: dict[str, Any] = {"flops_per_training_image": flops}
    for threads in (1, 2):
        peak = matmul_peak_gflops(threads, seconds=seconds)
        out[f"matmul_gflops_{threads}_threads"] = peak
        out[f"ceiling_images_per_s_{threads}_threads"] = peak * 1e9 / flops
    return out


# ---------------------------------------------------------------------------
# Thread policy: runs in separate processes
# ---------------------------------------------------------------------------


def worker(norm: str, threads: int, images: int, data_dir: str, epochs: int) -> None:
    """One process's share of the thread-policy lever: `epochs` epochs of `images` images on
    `threads` threads; prints {start, end, images} (wall clock) as JSON on stdout."""
    torch.set_num_threads(threads)
    train = load_split("mnist", True, data_dir).head(images)
    test = load_split("mnist", False, data_dir).head(256)
    run = make_run(norm, train, test)
    timed_epoch(make_run(norm, train.head(640), test))  # warm-up: kernel selection, page faults
    start = time.time()
    for _ in range(epochs):
        train_epoch(run)
    print(json.dumps({"start": start, "end": time.time(), "images": images * epochs}))


# OpenMP wait policies (torch's Linux wheels use GNU libgomp): what an idle worker thread
# does between parallel regions. libgomp spins GOMP_SPINCOUNT times before it sleeps:
# 300,000 by default, 0 under OMP_WAIT_POLICY=PASSIVE.
WAIT_POLICIES: dict[str, dict[str, str]] = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "default spin": {},
    "short spin": {"GOMP_SPINCOUNT": "10000"},
}


def launch(
    jobs: list[tuple[str, int]], images: int, data_dir: Path, epochs: int, policy: str = "passive"
) -> float:
    """Run (norm, threads) jobs at once, each in its own process under the OpenMP wait
    `policy` (WAIT_POLICIES); total training img/s over the span from the first training
    start to the last training end."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env = checkout_env({**env, **WAIT_POLICIES[policy]})
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", f"{norm},{threads}", "--images", str(images),
             "--worker-epochs", str(epochs), "--data-dir", str(data_dir)],  # fmt: skip
            stdout=subprocess.PIPE, text=True, env=env,
        )
        for norm, threads in jobs
    ]
    reports = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return sum(r["images"] for r in reports) / span


def serial(
    jobs: list[tuple[str, int]], images: int, data_dir: Path, epochs: int, policy: str
) -> float:
    """The jobs one after another: total images over the sum of their training spans."""
    spans = [images * epochs / launch([job], images, data_dir, epochs, policy) for job in jobs]
    return images * epochs * len(jobs) / sum(spans)


BASE = "1 run x 1 thread (bn)"
PACKED = "3 runs x 1 thread at once (bn, gn, ln): the study now"
SERIAL = "3 runs x 2 threads one after another (bn, gn, ln), {}"


def lever_threads(data_dir: Path, images: int, rounds: int, epochs: int) -> dict[str, Any]:
    """Total training img/s of several thread counts, packings and OpenMP wait policies,
    alternated round by round."""

    def go(jobs: list[tuple[str, int]], policy: str = "passive") -> Callable[[], float]:
        return lambda: launch(jobs, images, data_dir, epochs, policy)

    policies: dict[str, Callable[[], float]] = {BASE: go([("bn", 1)])}
    for policy in WAIT_POLICIES:
        policies[f"1 run x 2 threads (bn), {policy}"] = go([("bn", 2)], policy)
    for policy in ("passive", "short spin"):
        policies[f"2 runs x 2 threads at once (bn, bn), {policy}"] = go([("bn", 2)] * 2, policy)
    policies[PACKED] = go([(n, 1) for n in NORMS])
    for policy in ("passive", "short spin"):
        policies[SERIAL.format(policy)] = lambda p=policy: serial(
            [(n, 2) for n in NORMS], images, data_dir, epochs, p
        )
    rates = alternate(policies, rounds)
    rows = {
        name: {
            "images_per_s": statistics.median(v),
            "vs_1_run_1_thread": statistics.median(
                [x / b for x, b in zip(v, rates[BASE], strict=True)]
            ),
            "rounds_images_per_s": v,
        }
        for name, v in rates.items()
    }
    packing = {
        policy: [p / s for p, s in zip(rates[PACKED], rates[SERIAL.format(policy)], strict=True)]
        for policy in ("passive", "short spin")
    }
    return {"images_per_run": images * epochs, "rows": rows, "rounds_packing": packing,
            "packing_speedup": {k: statistics.median(v) for k, v in packing.items()}}  # fmt: skip


# ---------------------------------------------------------------------------
# Data, output, command
# ---------------------------------------------------------------------------


def synthetic_mnist(n: int) -> Split:
    from normcli.data import get_dataset, synthetic_split

    return synthetic_split(get_dataset("mnist"), n, seed=n)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: one table per lever."""
    r = report["levers"]
    lines = [
        "# Levers on MNIST training time",
        "",
        *smoke_banner(report["settings"]["quick"]),
        f"Measured {report['date']} on {describe(report['machine'])}. 1-minute load average "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} "
        f"after. {report['settings']['rounds']} rounds, variants alternated within each round; "
        "medians, and the median of the per-round ratios.",
        "",
        "```",
        report["command"],
        "```",
        "",
    ]

    def table(title: str, rows: dict[str, dict[str, Any]], keys: list[tuple[str, str]]) -> None:
        nonlocal lines
        lines += [f"### {title}", "", "| variant | " + " | ".join(k[1] for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]  # fmt: skip
        for name, row in rows.items():
            cells = []
            for key, _ in keys:
                v = row.get(key)
                cells.append("-" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")

    if "threads" in r:
        t = r["threads"]
        table(
            f"Thread policy ({t['images_per_run']:,} images per run, each run its own process)",
            t["rows"], [("images_per_s", "total img/s"), ("vs_1_run_1_thread", "vs 1 x 1")],
        )  # fmt: skip
        for policy, ratio in t["packing_speedup"].items():
            rounds_ = ", ".join(f"{x:.2f}" for x in t["rounds_packing"][policy])
            lines += [f"Packing, the study's three at once (1 thread each) against one after "
                      f"another (2 threads each, {policy} OpenMP): {ratio:.2f}x (rounds: "
                      f"{rounds_}).", ""]  # fmt: skip
    if "augment" in r:
        table(
            "Augmentation (BN + L1, 1 thread, batch 64)", r["augment"]["rows"],
            [("us_per_image", "step us/img"), ("augment_us_per_image", "augment us/img"),
             ("share_of_step", "share of step"), ("speedup_vs_none", "speed vs none")],
        )  # fmt: skip
    for lever, title, base in (("layout", "Memory layout", "channels_last"),
                               ("batch", "Batch size", "batch"),
                               ("compile", "torch.compile", "eager"),
                               ("bf16", "bf16 autocast", "float32")):  # fmt: skip
        if lever not in r:
            continue
        for norm, rows in r[lever]["norms"].items():
            keys = [("us_per_image", "us/img"), ("images_per_s", "img/s"),
                    ("speedup_vs_" + base, f"speed vs {base}")]  # fmt: skip
            if lever == "compile":
                keys.append(("compile_s", "compile s"))
            table(f"{title}: {norm} (1 thread)", rows, keys)
    if "eval" in r:
        table("Per-epoch evaluation (1 thread; share of a 60,000 + 10,000 image epoch)",
              r["eval"]["norms"], [("train_us_per_image", "train us/img"),
                                   ("eval_us_per_image", "eval us/img"),
                                   ("eval_share_of_full_epoch", "eval share")])  # fmt: skip
    if "peak" in r:
        p = r["peak"]
        lines += ["### Peak", "",
                  f"{p['flops_per_training_image'] / 1e6:.2f} MFLOP per training image; float32 "
                  f"matrix-multiply peak {p['matmul_gflops_1_threads']:.0f} GFLOP/s on 1 thread, "
                  f"{p['matmul_gflops_2_threads']:.0f} on 2: ceilings "
                  f"{p['ceiling_images_per_s_1_threads']:,.0f} and "
                  f"{p['ceiling_images_per_s_2_threads']:,.0f} training img/s.", ""]  # fmt: skip
    return "\n".join(lines)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    lever: Annotated[list[str] | None, typer.Option(help=f"One of {', '.join(LEVERS)}.")] = None,
    rounds: Annotated[int, typer.Option(help="A/B rounds.")] = 5,
    images: Annotated[int, typer.Option(help="Training images per timed epoch.")] = 6400,
    thread_images: Annotated[int, typer.Option(help="Images per run, thread lever.")] = 25600,
    data_dir: Annotated[Path | None, typer.Option(help="Data folder.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="JSON report here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Markdown report here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: tiny data.")] = False,
    worker_spec: Annotated[str | None, typer.Option("--worker", hidden=True)] = None,
    worker_epochs: Annotated[int, typer.Option(hidden=True)] = 1,
) -> None:
    """Measure the levers on normcli's MNIST training time."""
    root = data_dir or Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
    if worker_spec is not None:
        norm, threads = worker_spec.split(",")
        worker(norm, int(threads), images, str(root), worker_epochs)
        return
    chosen = lever or list(LEVERS)
    unknown = set(chosen) - set(LEVERS)
    if unknown:
        raise typer.BadParameter(f"unknown lever {sorted(unknown)[0]}; one of {LEVERS}")
    machine = machine_info()
    load_before = load_average()
    levers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="normcli-levers-") as tmp:
        if quick:
            rounds, images, thread_images = 1, 256, 256
            root = write_synthetic("mnist", Path(tmp), 512, 256)
        train = load_split("mnist", True, root).head(images)
        test = load_split("mnist", False, root)
        with use_threads(1):
            for name in chosen:
                console.print(f"lever {name} ...", highlight=False)
                if name == "threads":
                    levers[name] = lever_threads(root, thread_images, rounds, 1)
                elif name == "peak":
                    levers[name] = lever_peak(0.2 if quick else 2.0)
                elif name == "batch":
                    levers[name] = lever_batch(train, test, rounds, (32, 64, 128, 256))
                else:
                    levers[name] = globals()[f"lever_{name}"](train, test, rounds)
                console.print(json.dumps(levers[name], default=str)[:2000], highlight=False)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {"rounds": rounds, "images": images, "thread_images": thread_images,
                     "quick": quick},  # fmt: skip
        "levers": levers,
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(render_markdown(report))


if __name__ == "__main__":
    app()
