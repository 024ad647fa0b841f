"""Levers on MNIST training time, each measured on its own, variants alternated in one run.

    python bench/levers.py --json bench/results/levers.json --markdown bench/results/levers.md
    python bench/levers.py --lever layout --lever augment     # some of them

Each figure times normcli's own training step (`normcli.train.new_run` and `train_epoch` on
the first --images training images, the study's recipe, L1 for BN) on one thread, by that
thread's CPU time (so a variant is not charged for the time other processes held the core;
torch.compile's compile time is wall time), the variants alternated round after round and the
median of the per-round ratios reported: slow drifts of a shared machine cancel. Levers:
augment (the augmentation's cost against the whole step: MNIST's rotation + sub-pixel shift
with its grid from F.affine_grid as before and built separably as now, a whole-pixel
translation, none); per norm: layout (channels_last against contiguous), batch (32 to 256),
eval (one evaluation of the test split against one training epoch), compile (torch.compile
against eager), bf16 (bfloat16 autocast against float32); peak (the float32 matrix-multiply
peak on 1 and 2 threads, FLOPs per training image, the ceiling they make). The thread and
OpenMP policy lever this script had is superseded by bench/threads_per_run.sh (through
`normcli train`) and bench/sweep_packing.py; its last figures stay in bench/results/levers.md.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import machine  # bench/machine.py: a script's folder is on sys.path
import torch
import torch.nn.functional as F
import typer

from normcli.config import ModelArgs, RunSpec
from normcli.data import Augment, Split, load_split
from normcli.evaluate import evaluate
from normcli.run import Run, new_run
from normcli.runtime import use_threads
from normcli.train import train_epoch

CPU = torch.device("cpu")
NORMS = ("bn", "gn", "ln")
L1 = {"bn": 1e-4}  # the study's BN + L1
LEVERS = ("augment", "layout", "batch", "eval", "compile", "bf16", "peak")
Lever = Enum("Lever", {name: name for name in LEVERS}, type=str)  # closed choices for --help


class AffineGridRotation:
    """MNIST's augmentation as built before: its sampling grid from F.affine_grid."""

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


def make_run(norm: str, train: Split, test: Split, **options: Any) -> Run:
    """A fresh run of the study's recipe for `norm` on all of `train`; `options` override."""
    options = {"batch_size": 64, "l1": L1.get(norm, 0.0), "threads": torch.get_num_threads(),
               **options}  # fmt: skip
    spec = RunSpec.from_options(dataset="mnist", norm=norm, **options)
    return new_run(spec.resolve(), train, test, CPU)


def timed_epoch(run: Run, context: AbstractContextManager | None = None) -> float:
    """This thread's CPU seconds for one `train_epoch` of `run` (on one torch thread)."""
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


def epochs(runs: dict[str, Run], contexts: dict[str, Callable] | None = None) -> dict[str, Any]:
    """A timed epoch of each run as a variant, in its `contexts` (name -> context maker)."""

    def epoch(run: Run, context: Callable | None) -> Callable[[], float]:
        return lambda: timed_epoch(run, context() if context else None)

    return {name: epoch(run, (contexts or {}).get(name)) for name, run in runs.items()}


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


def per_norm(train: Split, test: Split, rounds: int, variants: dict[str, dict], base: str,
             contexts: dict[str, Callable] | None = None) -> dict[str, Any]:  # fmt: skip
    """For each norm: the `variants` (name -> make_run options), alternated, against `base`."""
    out = {}
    for norm in NORMS:
        runs = {name: make_run(norm, train, test, **kw) for name, kw in variants.items()}
        out[norm] = ratio_summary(alternate(epochs(runs, contexts), rounds), base, len(train))
    return {"threads": 1, "images": len(train), "norms": out}


def lever_augment(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """Each augmentation alone (batches of 64) and its share of the whole BN + L1 step."""
    runs = {name: make_run("bn", train, test) for name in AUGMENTS}
    for name, aug in AUGMENTS.items():
        runs[name].augment = aug
    rows = ratio_summary(alternate(epochs(runs), rounds), "none", len(train))
    x = train.images[:64].float() / 255

    def alone(aug: Any) -> Callable[[], float]:
        def us_per_image() -> float:
            generator, start = torch.Generator().manual_seed(0), time.thread_time()
            for _ in range(50):
                aug(x, generator)
            return 1e6 * (time.thread_time() - start) / (50 * len(x))

        return us_per_image

    for name, us in alternate({n: alone(a) for n, a in AUGMENTS.items()}, rounds).items():
        rows[name]["augment_us_per_image"] = statistics.median(us)
        rows[name]["share_of_step"] = statistics.median(us) / rows[name]["us_per_image"]
    return {"norm": "bn", "threads": 1, "images": len(train), "rows": rows}


def lever_eval(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """One evaluation of the test split against one training epoch, per norm, one thread."""
    out = {}
    for norm in NORMS:
        run = make_run(norm, train, test)

        def evaluation(run: Run = run) -> float:
            gc.collect()
            start = time.thread_time()
            evaluate(run.model, test, run.dataset)
            return time.thread_time() - start

        s = alternate({"train": lambda run=run: timed_epoch(run), "eval": evaluation}, rounds)
        train_us = 1e6 * statistics.median(s["train"]) / len(train)
        eval_us = 1e6 * statistics.median(s["eval"]) / len(test)
        # Per epoch of the real data: 60,000 training images, 10,000 test images.
        share = 10_000 * eval_us / (60_000 * train_us + 10_000 * eval_us)
        out[norm] = {"train_us_per_image": train_us, "eval_us_per_image": eval_us,
                     "eval_share_of_full_epoch": share, "rounds_train_s": s["train"],
                     "rounds_eval_s": s["eval"]}  # fmt: skip
    return {"threads": 1, "norms": out}


def lever_compile(train: Split, test: Split, rounds: int) -> dict[str, Any]:
    """torch.compile (inductor): compile time, then steady-state epochs against eager."""
    out = {}
    for norm in NORMS:
        runs = {"eager": make_run(norm, train, test), "compiled": make_run(norm, train, test)}
        runs["compiled"].model = torch.compile(runs["compiled"].model)
        start = time.perf_counter()  # wall: inductor compiles in worker processes too
        timed_epoch(runs["compiled"])  # compiles (forward and backward) in its first steps
        first = time.perf_counter() - start
        seconds = alternate(epochs(runs), rounds)
        out[norm] = ratio_summary(seconds, "eager", len(train))
        out[norm]["compiled"]["first_epoch_wall_s"] = first
        out[norm]["compiled"]["compile_s"] = first - statistics.median(seconds["compiled"])
        torch._dynamo.reset()  # noqa: SLF001 - the next norm compiles from scratch
    return {"threads": 1, "images": len(train), "norms": out}


def lever(name: str, train: Split, test: Split, rounds: int, quick: bool) -> dict[str, Any]:
    """The in-process lever `name`."""
    if name == "layout":
        layouts = {"channels_last": {"channels_last": True}, "contiguous": {"channels_last": False}}
        return per_norm(train, test, rounds, layouts, "channels_last")
    if name == "batch":
        sizes = {f"batch {b}": {"batch_size": b} for b in (32, 64, 128, 256)}
        return per_norm(train, test, rounds, sizes, "batch 32")
    if name == "bf16":
        bf16 = {"bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
        return per_norm(train, test, rounds, {"float32": {}, "bf16 autocast": {}}, "float32", bf16)
    if name == "peak":
        model = ModelArgs(dataset="mnist").resolve().build()
        return machine.ceiling(model, (1, 28, 28), (1, 2), 0.2 if quick else 2.0)
    return {"augment": lever_augment, "eval": lever_eval, "compile": lever_compile}[name](
        train, test, rounds
    )


def lever_table(title: str, rows: dict[str, dict], keys: dict[str, str]) -> list[str]:
    """A lever's section: one row per variant, the columns `keys` (JSON key -> heading)."""

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v)

    cells = [[name, *(cell(row.get(k)) for k in keys)] for name, row in rows.items()]
    return [f"### {title}", "", *machine.table(["variant", *keys.values()], cells)]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: one table per lever."""
    r, lines = report["levers"], []
    if "augment" in r:
        lines += lever_table("Augmentation (BN + L1, 1 thread, batch 64)", r["augment"]["rows"], {
            "us_per_image": "step us/img", "augment_us_per_image": "augment us/img",
            "share_of_step": "share of step", "speedup_vs_none": "speed vs none"})  # fmt: skip
    for name, title, base in (("layout", "Memory layout", "channels_last"),
                              ("batch", "Batch size", "batch"),
                              ("compile", "torch.compile", "eager"),
                              ("bf16", "bf16 autocast", "float32")):  # fmt: skip
        keys = {"us_per_image": "us/img", "images_per_s": "img/s",
                f"speedup_vs_{base}": f"speed vs {base}"}  # fmt: skip
        keys.update({"compile_s": "compile s"} if name == "compile" else {})
        for norm, rows in r.get(name, {}).get("norms", {}).items():
            lines += lever_table(f"{title}: {norm} (1 thread)", rows, keys)
    if "eval" in r:
        lines += lever_table("Per-epoch evaluation (1 thread; share of a 60,000 + 10,000 image "
                             "epoch)", r["eval"]["norms"], {"train_us_per_image": "train us/img",
                             "eval_us_per_image": "eval us/img",
                             "eval_share_of_full_epoch": "eval share"})  # fmt: skip
    if "peak" in r:
        p = r["peak"]
        lines += ["### Peak", "", f"{p['flops_per_training_image'] / 1e6:.2f} MFLOP per training "
                  f"image; float32 matrix-multiply peak {p['matmul_gflops_1_threads']:.0f} GFLOP/s "
                  f"on 1 thread, {p['matmul_gflops_2_threads']:.0f} on 2: ceilings "
                  f"{p['ceiling_images_per_s_1_threads']:,.0f} and "
                  f"{p['ceiling_images_per_s_2_threads']:,.0f} training img/s.", ""]  # fmt: skip
    return machine.page(report, __doc__, *lines)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    levers: Annotated[list[Lever] | None, typer.Option("--lever", help="Default: all.")] = None,
    rounds: Annotated[int, typer.Option(help="A/B rounds.")] = 5,
    images: Annotated[int, typer.Option(help="Training images per timed epoch.")] = 6400,
    data_dir: machine.DataDirOpt = None,
    json_path: machine.JsonOpt = None,
    markdown: machine.MarkdownOpt = None,
    quick: machine.QuickOpt = False,
) -> None:
    """Measure the levers on normcli's MNIST training time."""
    rounds, images = (1, 256) if quick else (rounds, images)
    settings = {"rounds": rounds, "images": images, "quick": quick}
    report = machine.new_report(settings=settings, levers={})
    with tempfile.TemporaryDirectory(prefix="normcli-levers-") as tmp, use_threads(1):
        root = machine.data_root(data_dir, quick, Path(tmp), ("mnist",), (512, 256))
        train, test = load_split("mnist", True, root).head(images), load_split("mnist", False, root)
        for name in [choice.value for choice in levers or []] or LEVERS:
            print(f"lever {name} ...", file=sys.stderr)
            report["levers"][name] = lever(name, train, test, rounds, quick)
            print(json.dumps(report["levers"][name])[:2000], file=sys.stderr)
    report["load_average_after"] = machine.load_average()
    machine.write_reports(report, json_path, markdown, render_markdown)


if __name__ == "__main__":
    machine.run_app(app)
