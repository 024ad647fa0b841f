"""The one place the bench tests run bench/ scripts from, and check what every report records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The CPU flags that decide which kernels torch can use: every report must say which it has.
SPEED_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def run_script(
    name: str, *args: str | Path, timeout: float = 600, threads: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run bench/NAME with ARGS from the repository root, without $NORMCLI_DATA."""
    env = {k: v for k, v in os.environ.items() if k != "NORMCLI_DATA"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def assert_names_the_machine(report: dict, page: str) -> None:
    """The report and its page name the CPU model and whether it has each speed flag."""
    machine = report["machine"]
    assert set(machine["cpu_flags"]) >= SPEED_FLAGS
    assert f"`{machine['lscpu_model_name']}`" in page and machine["torch"] in page
    for flag in machine["cpu_flags"]:
        assert flag in page, flag
    assert report["command"] in page
