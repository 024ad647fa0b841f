"""bench/throughput.py runs end to end on tiny generated data; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bench_scripts import assert_names_the_machine, run_script


def run_bench(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_script("throughput.py", *args, timeout=timeout)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One --quick run over both datasets: (the JSON report from stdout, the Markdown page)."""
    page = tmp_path_factory.mktemp("bench") / "throughput.md"
    result = run_bench(
        "--quick", "--dataset", "mnist", "--dataset", "cifar10", "--json", "-", "--markdown", page
    )
    assert result.returncode == 0, result.stderr
    assert "| ratio A/B (rounds) |" in result.stderr  # the table goes to stderr, stdout: JSON
    return json.loads(result.stdout), page.read_text()


def test_quick_reports_both_pipelines_for_train_and_eval(quick_report: tuple[dict, str]) -> None:
    report, _ = quick_report
    assert report["settings"]["quick"] is True
    assert [r["dataset"] for r in report["results"]] == ["mnist", "cifar10"]
    for result in report["results"]:
        for phase in ("train", "eval"):
            summary = result[phase]
            for key in ("normcli_images_per_s", "reference_images_per_s", "ratio"):
                assert summary[key] > 0, (result["dataset"], phase, key)
            assert summary["images"] > 0
            rounds = summary["rounds"]
            assert len(rounds["ratio"]) == report["settings"]["rounds"] == 1
            assert summary["target"] is None  # no pass/fail verdict on generated data


def test_quick_markdown_names_machine_and_command(quick_report: tuple[dict, str]) -> None:
    report, page = quick_report
    assert_names_the_machine(report, page)
    assert "--quick" in report["command"] and "not a measurement" in page
    assert "| mnist |" in page and "| cifar10 |" in page


def test_each_pipeline_runs_under_its_own_openmp_policy(quick_report: tuple[dict, str]) -> None:
    """A under normcli's policy for a lone run (libgomp's default spin: normcli.runtime), B in
    its own process under libgomp's default spin, as a notebook runs; `--reference-spin same`
    puts B back in. A's precision and layout are normcli.tuning's choice, named."""
    report, page = quick_report
    assert report["machine"]["GOMP_SPINCOUNT"] is None
    assert report["settings"]["reference_openmp"] == "own process, GOMP_SPINCOUNT=300000"
    assert "OpenMP libgomp's default (300,000 spins);" in page  # this process's, A's
    assert "reference_openmp own process, GOMP_SPINCOUNT=300000" in page
    assert report["results"][0]["precision"] in ("fp32", "bf16")
    layout = "contiguous" if not report["results"][0]["channels_last"] else "channels_last"
    assert "A's precision and layout (normcli.tuning; B: fp32, contiguous): mnist " in page
    assert f"mnist {report['results'][0]['precision']}, {layout}; cifar10 " in page
    result = run_bench("--quick", "--reference-spin", "same", "--json", "-")
    assert result.returncode == 0, result.stderr
    same = json.loads(result.stdout)
    assert same["settings"]["reference_openmp"] == "same process as A"
    assert same["results"][0]["train"]["reference_images_per_s"] > 0
    bad = run_bench("--quick", "--reference-spin", "lots")
    assert bad.returncode == 2 and "--reference-spin" in bad.stderr


def test_fewer_than_three_rounds_is_refused() -> None:
    result = run_bench("--rounds", "2", "--data-dir", "/nonexistent")
    assert result.returncode == 2
    assert "Invalid value for '--rounds'" in result.stderr  # Typer's range check, min 3
