"""Shared fixtures: tiny datasets in the official file formats, a CLI runner, tiny checkpoints."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normcli import plots
from normcli.cli import main
from normcli.data import write_synthetic

TINY_TRAIN = 200
TINY_TEST = 100

# No timed trial of precision and layout when a run starts (normcli.tuning): runs here and in
# the processes they start decide by the CPU's flags and the norm's record alone, the same
# every time, and leave the user's cache alone.
os.environ.setdefault("NORMCLI_TUNE", "0")

# Any download attempt fails at once (connection refused), never reaches the network.
OFFLINE = {
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": None,
    "NO_PROXY": None,
    "NORMCLI_DATA": None,
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with tiny MNIST and CIFAR-10 in the official layouts."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic("mnist", root, TINY_TRAIN, TINY_TEST)
    write_synthetic("cifar10", root, TINY_TRAIN, TINY_TEST)
    return root


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> CliResult:
    """Run `normcli ARGS` in-process: Typer's CliRunner isolation around the real entry point."""
    runner = CliRunner()
    with runner.isolation(env=env) as (out, err, _):
        code = main([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return CliResult(code, stdout, stderr)


@pytest.fixture
def cli():
    return run_cli


def train_tiny(data: Path, out: Path, *extra: str, dataset: str = "mnist") -> Path:
    """Train a tiny 2-epoch model through the CLI; returns the checkpoint path."""
    result = run_cli(
        "train", "--dataset", dataset, "--data-dir", data, "--epochs", "2",
        "--batch-size", "32", "--device", "cpu", "--out", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints trained on the tiny data: mnist bn+L1, gn, ln and one cifar10 bn."""
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "bn_l1": train_tiny(
            tiny_data, folder / "bn_l1.safetensors", "--norm", "bn", "--l1", "1e-4"
        ),
        "gn": train_tiny(tiny_data, folder / "gn.safetensors", "--norm", "gn", "--groups", "2"),
        "ln": train_tiny(tiny_data, folder / "ln.safetensors", "--norm", "ln"),
        "cifar": train_tiny(tiny_data, folder / "cifar.safetensors", dataset="cifar10"),
    }


@pytest.fixture
def captured_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib Figure the commands save, in order."""
    figures = []
    original = plots.save_figure

    def capture(fig, path, fmt=None):
        figures.append(fig)
        return original(fig, path, fmt)

    monkeypatch.setattr(plots, "save_figure", capture)
    return figures


@pytest.fixture(scope="module")
def workers_import_the_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Ray workers inherit the environment of whoever starts Ray: let them import the tests
    (conftest and the requesting module, which lives in a subfolder)."""
    here = Path(__file__).resolve().parent
    with pytest.MonkeyPatch.context() as mp:
        path = os.environ.get("PYTHONPATH", "")
        parts = (str(request.path.parent), str(here), str(here.parent), path)
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in parts if p))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        yield
