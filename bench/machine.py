"""What every benchmark shares: the machine its numbers ran on (CPU model and flags, load,
compute peak), its options, and the one writer of its reports (JSON and a Markdown page).

Imported by the scripts in bench/ (they run as `python bench/NAME.py`, so this folder is on
sys.path); `python bench/machine.py` prints the machine's sentence (for the shell scripts).
Uses normcli's public API only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import nn

from normcli.console import to_markdown
from normcli.data import DATA_ENV, write_synthetic
from normcli.errors import NormcliError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"  # ../shared/data from the repository root
# lscpu flags that decide which CPU kernels torch can use, hence its speed.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
SMOKE_BANNER = "**Smoke run on tiny generated data (--quick): not a measurement.**"

# The options every benchmark takes, declared once.
JsonOpt = Annotated[Path | None, typer.Option("--json", help="JSON report here ('-': stdout).")]
MarkdownOpt = Annotated[Path | None, typer.Option(help="Markdown report here ('-': stdout).")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Default: $NORMCLI_DATA, ../shared/data.")]
QuickOpt = Annotated[bool, typer.Option("--quick", help="Smoke run on tiny generated data.")]


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = " ".join(value.split())
    return fields


def machine_info() -> dict[str, Any]:
    """The CPU (lscpu 'Model name', its speed-relevant flags), cores, threads and software."""
    import torchvision  # only for its version

    lscpu = _lscpu()
    flags = set(lscpu.get("Flags", "").split())
    return {
        "lscpu_model_name": lscpu.get("Model name") or platform.processor(),
        "cpu_flags": {f: f in flags for f in SPEED_FLAGS},
        "avx512": any(f.startswith("avx512") for f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def openmp_policy(machine: dict[str, Any]) -> str:
    """The OpenMP wait policy in the environment the numbers ran under."""
    if "GOMP_SPINCOUNT" not in machine:  # recorded before normcli's spin: PASSIVE was its default
        return f"OMP_WAIT_POLICY={machine.get('OMP_WAIT_POLICY') or 'PASSIVE'}"
    chosen = [f"{k}={machine[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if machine.get(k)]
    return ", ".join(chosen) or "libgomp's default (300,000 spins)"


def describe(machine: dict[str, Any]) -> str:
    """One Markdown sentence naming the machine: CPU model and flags, cores, software."""
    flags = machine.get("cpu_flags", {})
    has = " ".join(f for f in SPEED_FLAGS if flags.get(f)) or "none"
    lacks = " ".join(f for f in SPEED_FLAGS if flags.get(f) is False)
    has += f"; without {lacks}" if lacks else ""
    return (
        f"`{machine['lscpu_model_name']}` (CPU flags {has}; torch CPU "
        f"capability {machine['torch_cpu_capability']}), {machine['cpus']} cores "
        f"({machine['usable_cpus']} usable), {machine['torch_threads']} torch threads, OpenMP "
        f"{openmp_policy(machine)}; torch {machine['torch']}, torchvision "
        f"{machine['torchvision']}, Python {machine['python']}"
    )


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 15.0) -> float:
    """Wait for a 1-minute load average <= `max_load`, at most `max_wait_s`; seconds waited."""
    start = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - start < max_wait_s:
        time.sleep(poll_s)
    return time.monotonic() - start


def ceiling(
    model: nn.Module, input_shape: tuple[int, ...], threads: tuple[int, ...], seconds: float
) -> dict[str, float]:
    """FLOPs per training image (torch's FLOP counter: convolutions and matrix products), the
    best float32 matrix-multiply GFLOP/s on each thread count, and the img/s that allows."""
    from torch.utils.flop_counter import FlopCounterMode

    x, before = torch.randn(16, *input_shape), torch.get_num_threads()
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    flops = counter.get_total_flops() / len(x)
    out, n = {"flops_per_training_image": flops}, 1024
    a, b, product = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    try:
        for count in threads:
            torch.set_num_threads(count)
            best, deadline = 0.0, time.perf_counter() + seconds
            for _ in range(3):  # warm-up
                torch.mm(a, b, out=product)
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                torch.mm(a, b, out=product)
                best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
            out[f"matmul_gflops_{count}_threads"] = best
            out[f"ceiling_images_per_s_{count}_threads"] = best * 1e9 / flops
    finally:
        torch.set_num_threads(before)
    return out


def checkout_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on PYTHONPATH: child processes import its normcli."""
    path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path}


def data_root(
    data_dir: Path | None,
    quick: bool = False,
    tmp: Path | None = None,
    datasets: tuple[str, ...] = (),
    sizes: tuple[int, int] = (256, 128),
) -> Path:
    """The data folder: tiny generated `datasets` in `tmp` for --quick, else the usual one."""
    if not quick:
        return data_dir or Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
    assert tmp is not None
    for name in datasets:
        write_synthetic(name, tmp / "data", *sizes)
    return tmp / "data"


def new_report(**fields: Any) -> dict[str, Any]:
    """A report's head: the command, the date, the machine and its load now; then `fields`."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_average_before": load_average(),
        **fields,
    }


def table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table's lines (normcli's own writer) and a blank line after it."""
    return [*to_markdown(columns, rows).splitlines(), ""]


def page(report: dict[str, Any], doc: str, *body: str, title: str | None = None) -> str:
    """A report as a Markdown page: title (default: `doc`'s first line), machine, command,
    `body`, settings, and the method (the rest of `doc`, less its command examples)."""
    first, *paragraphs = doc.strip().split("\n\n")
    machine = f"Measured {report['date']} on {describe(report['machine'])}"
    loads = [(when, report.get(f"load_average_{when}")) for when in ("before", "after")]
    if any(v for _, v in loads):  # a summary of earlier runs measures no load of its own
        machine += "; 1-minute load average " + ", ".join(f"{v[0]:.2f} {w}" for w, v in loads if v)
    settings = report.get("settings", {})
    return "\n".join([
        f"# {title or ' '.join(first.split()).rstrip('.')}", "",
        *([SMOKE_BANNER, ""] if settings.get("quick") else []), machine + ".", "",
        "Command, from the repository root:", "", "```", report["command"], "```", "", *body,
        "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", "",
        "## Method", "", *(p + "\n" for p in paragraphs if not p.startswith("    ")),
    ])  # fmt: skip


def mean_std(mean: float, std: float | None, digits: int) -> str:
    """'mean ± std', or the mean alone where there is no spread to give (one seed)."""
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_reports(
    report: dict[str, Any], json_path: Path | None, markdown: Path | None, render: Any
) -> None:
    """Write the report as JSON and as `render(report)` where asked ('-': stdout)."""
    for path, text in ((json_path, lambda: json.dumps(report, indent=2) + "\n"),
                       (markdown, lambda: render(report))):  # fmt: skip
        if path is not None and str(path) == "-":
            sys.stdout.write(text())
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text())


def run_app(app: typer.Typer) -> None:
    """Run a benchmark's command: a NormcliError is one line on stderr and its exit code."""
    try:
        app()
    except NormcliError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    print(describe(machine_info()))
