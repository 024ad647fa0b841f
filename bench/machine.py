"""What every benchmark records next to its numbers: the machine, its load, its compute peak.

Imported by the scripts in bench/ (they run as `python bench/NAME.py`, so this folder is on
sys.path); nothing here imports normcli's CLI.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Flags that decide which CPU kernels torch can use (lscpu's 'Flags' line).
_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


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
    """The CPU (lscpu 'Model name', the kernel-relevant flags), cores, threads and software."""
    import torchvision  # only for its version

    lscpu = _lscpu()
    flags = set(lscpu.get("Flags", "").split())
    return {
        "lscpu_model_name": lscpu.get("Model name") or platform.processor(),
        "cpu_flags": {f: f in flags for f in _FLAGS_OF_INTEREST},
        "avx512": any(f.startswith("avx512") for f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def describe(machine: dict[str, Any]) -> str:
    """One Markdown sentence naming the machine."""
    avx512 = "with AVX-512" if machine["avx512"] else "no AVX-512"
    bf16 = "native bf16" if machine["cpu_flags"].get("avx512_bf16") else "no native bf16"
    return (
        f"`{machine['lscpu_model_name']}` ({avx512}, {bf16}; torch CPU capability "
        f"{machine['torch_cpu_capability']}), {machine['cpus']} cores "
        f"({machine['usable_cpus']} usable); torch {machine['torch']}, torchvision "
        f"{machine['torchvision']}, Python {machine['python']}"
    )


def openmp_policy(machine: dict[str, Any]) -> str:
    """The OpenMP wait policy in the environment the numbers ran under (normcli sets
    GOMP_SPINCOUNT=1000 in its processes where neither variable is set)."""
    chosen = [f"{k}={machine[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if machine.get(k)]
    return ", ".join(chosen) or "libgomp's default (300,000 spins)"


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 15.0) -> float:
    """Wait until the 1-minute load average is at most `max_load` (or `max_wait_s` has
    passed); returns the seconds waited."""
    start = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - start < max_wait_s:
        time.sleep(poll_s)
    return time.monotonic() - start


def matmul_peak_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """Best float32 GFLOP/s of an n x n matrix product on `threads` threads (best of several
    timed repeats: the machine's attainable peak, not an average)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        for _ in range(3):  # warm-up
            torch.mm(a, b, out=out)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def training_flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of one training image (forward and backward) as torch's FLOP counter counts them
    (convolutions and matrix products; the norms and activations are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 16
    x = torch.randn(batch, *input_shape)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


REPO = Path(__file__).resolve().parents[1]
SMOKE_BANNER = "**Smoke run on tiny generated data (--quick): not a measurement.**"


def checkout_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on PYTHONPATH: child processes import its normcli."""
    path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path}


def smoke_banner(quick: bool) -> list[str]:
    """A report's warning lines when it came from a --quick smoke run, else none."""
    return [SMOKE_BANNER, ""] if quick else []


def command_block(command: str) -> list[str]:
    """The lines that give a report's command as run from the repository root."""
    return ["Command, from the repository root:", "", "```", command, "```"]


def mean_std(mean: float, std: float | None, digits: int) -> str:
    """'mean ± std', or the mean alone where there is no spread to give (one seed)."""
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_text(path: Path, text: str) -> None:
    """Write a report to PATH ('-': stdout), making its folder."""
    if str(path) == "-":
        sys.stdout.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
