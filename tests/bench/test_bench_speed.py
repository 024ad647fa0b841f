"""bench/time_to_accuracy.py, levers.py, choose_defaults.py and sweep_packing.py run end to
end on tiny generated data (--quick); no timing is asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bench_scripts import assert_names_the_machine
from bench_scripts import run_script as run_bench_script


def run_script(name: str, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_bench_script(name, *args, timeout=timeout, threads=1)


@pytest.fixture(scope="module")
def study_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One --quick study: (the JSON report from stdout, the Markdown page)."""
    page = tmp_path_factory.mktemp("tta") / "time_to_accuracy.md"
    result = run_script("time_to_accuracy.py", "--quick", "--json", "-", "--markdown", page)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), page.read_text()


def test_quick_study_runs_the_three_trainings_and_checks_them(study_report) -> None:
    report, _ = study_report
    (study,) = report["studies"]
    assert set(study["runs"]) == {"bn_l1", "gn", "ln"}
    for run in study["runs"].values():
        assert run["epochs"] == 1 and len(run["test_accuracy"]) == 1
        assert run["threads"] == 1  # the study packs one-thread trainings
    assert study["runs"]["bn_l1"]["l1"] == 1e-4
    assert study["wall_s"] > 0 and study["cpu_s"] > 0
    assert {"train bn_l1", "train gn", "train ln", "eval"} <= set(study["steps_s"])
    assert "| bn_l1 |" in study["table"]  # the table the script printed
    assert report["check"]["met"] == {"wall": None, "last3": None, "final_mean": None}
    assert report["throughput"]["fraction_of_ceiling"] > 0


def test_quick_study_page_names_machine_command_and_load(study_report) -> None:
    report, page = study_report
    assert_names_the_machine(report, page)
    assert len(report["studies"][0]["load_average_before"]) == 3
    assert "not a measurement" in page


def test_one_seed_has_no_spread_and_a_report_re_renders_from_its_json(
    study_report, tmp_path: Path
) -> None:
    report, page = study_report
    for norm in report["check"]["norms"].values():  # one seed: no "± 0.000"
        assert norm["final_std"] is None and len(norm["final"]) == 1
        assert f"| {norm['label']} | {norm['final_mean']:.3f} | " in page
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report))
    again = tmp_path / "again.md"
    result = run_script("time_to_accuracy.py", "--render", saved, "--markdown", again)
    assert result.returncode == 0, result.stderr
    assert again.read_text() == page


def test_quick_levers_report_each_lever(tmp_path: Path) -> None:
    page = tmp_path / "levers.md"
    result = run_script(
        "levers.py", "--quick", "--lever", "augment", "--lever", "peak",
        "--json", tmp_path / "levers.json", "--markdown", page,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "levers.json").read_text())
    levers = report["levers"]
    assert set(levers) == {"augment", "peak"}
    assert set(levers["augment"]["rows"]) >= {"none", "translate (crop, whole pixels)"}
    assert levers["peak"]["flops_per_training_image"] > 1e6
    assert "### Augmentation" in page.read_text()
    assert_names_the_machine(report, page.read_text())
    bad = run_script("levers.py", "--quick", "--lever", "speed")
    assert bad.returncode == 2 and "'--lever'" in bad.stderr


@pytest.fixture(scope="module")
def val_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, list[float]], Path]:
    """bench/choose_defaults.py train on tiny data, BN and LN, one seed: (the folder, each
    norm's validation accuracies as stored, the data folder)."""
    from normcli.checkpoint import read_metadata
    from normcli.data import write_synthetic

    tmp = tmp_path_factory.mktemp("val")
    root, out = write_synthetic("mnist", tmp / "data", 256, 64), tmp / "runs" / "e3"
    args = ["--epochs", "3", "--seeds", "1", "--norms", "bn,ln", "--val", "64", "--jobs", "2"]
    result = run_script("choose_defaults.py", "train", "--out", out, *args, "--data-dir", root)
    assert result.returncode == 0, result.stderr
    paths = sorted(out.glob("*.safetensors"))
    assert [p.name for p in paths] == ["bn_s1.safetensors", "ln_s1.safetensors"]
    histories = {}
    for path in paths:
        meta = read_metadata(path)
        assert meta.train_args.val == 64 and meta.train_args.threads == 1
        assert meta.train_args.l1 == (1e-4 if meta.model_args.norm == "bn" else 0.0)
        histories[meta.model_args.norm] = [row["val_accuracy"] for row in meta.history]
    stamp = {p: p.stat().st_mtime_ns for p in paths}  # a second train keeps finished runs
    again = run_script("choose_defaults.py", "train", "--out", out, *args, "--data-dir", root)
    assert again.returncode == 0 and {p: p.stat().st_mtime_ns for p in paths} == stamp
    return out, histories, root


def test_choose_defaults_judges_the_held_out_split(val_runs, tmp_path: Path) -> None:
    """The summary reads the validation accuracies from the stored histories, and one seed
    can reject but not accept."""
    out, histories, _ = val_runs
    summary, page = tmp_path / "val.json", tmp_path / "val.md"
    result = run_script(
        "choose_defaults.py", "summarize", out, "--json", summary, "--markdown", page
    )
    assert result.returncode == 0, result.stderr
    assert_names_the_machine(json.loads(summary.read_text()), page.read_text())
    rows = {r["norm"]: r for r in json.loads(summary.read_text())["rows"]}
    assert set(rows) == {"bn", "ln"}
    for norm, accs in histories.items():
        row = rows[norm]
        assert row["seeds"] == [1] and row["last3"] == [accs[-3:]]
        assert row["final_mean"] == pytest.approx(accs[-1])
        # one seed: a failure rejects, a pass stays open until three seeds agree
        assert row["meets"] == ("no" if min(accs) < 99.4 else "open (1 seed)")


def test_choose_defaults_ablates_a_trick_against_a_reference_with_tta(
    val_runs, tmp_path: Path
) -> None:
    """A folder trained with --ema and --label-smoothing records both; summarize --reference
    gives each seed's paired difference from the reference folder, and --tta the final
    weights' TTA accuracy on the run's own held-out images (the ones its history scored)."""
    from normcli import data, tta
    from normcli.checkpoint import load_checkpoint, read_metadata
    from normcli.evaluate import evaluate
    from normcli.run import hold_out

    ref, histories, root = val_runs
    out = ref.parent / "e3_tricks"
    args = ["--epochs", "3", "--seeds", "1", "--norms", "bn", "--val", "64", "--jobs", "1"]
    tricks = ["--ema", "0.9", "--label-smoothing", "0.2"]
    result = run_script("choose_defaults.py", "train", "--out", out, *args, *tricks,
                        "--data-dir", root)  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = out / "bn_s1.safetensors"
    t = read_metadata(path).train_args
    assert (t.ema, t.label_smoothing, t.epochs) == (0.9, 0.2, 3)
    final = read_metadata(path).history[-1]["val_accuracy"]
    summary = tmp_path / "ablation.json"
    result = run_script("choose_defaults.py", "summarize", ref, out, "--reference", ref.name,
                        "--tta", "--data-dir", root, "--json", summary)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {(r["folder"], r["norm"]): r for r in json.loads(summary.read_text())["rows"]}
    row = rows[out.name, "bn"]
    assert row["recipe"] == "3 epochs, batch 64, lr 0.05, EMA 0.9, label smoothing 0.2"
    assert row["vs"][ref.name]["mean"] == pytest.approx(final - histories["bn"][-1])
    assert row["vs"][ref.name]["n"] == 1 and row["vs"][ref.name]["interval"] is None
    assert rows[ref.name, "bn"]["vs"] == {}  # the reference is not compared with itself
    assert rows[ref.name, "ln"]["vs"] == {}  # nor a norm the other folder lacks
    ckpt = load_checkpoint(path)
    held = hold_out(data.load_split("mnist", True, root), 64, 1)[1]
    dataset = data.get_dataset("mnist")
    assert evaluate(ckpt.model, held, dataset).accuracy == pytest.approx(final)  # the same split
    expected = tta.evaluate_tta(ckpt.model, held, dataset).accuracy
    assert row["tta_finals"] == [pytest.approx(expected)]
    assert row["tta_gain"]["mean"] == pytest.approx(expected - final)
    bad = run_script("choose_defaults.py", "summarize", ref, "--reference", "nowhere")
    assert bad.returncode == 2 and "--reference" in bad.stderr


def test_quick_sweep_packing_times_both_sides_of_the_same_grid(tmp_path: Path) -> None:
    page = tmp_path / "packing.md"
    result = run_script("sweep_packing.py", "--quick", "--json", "-", "--markdown", page)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"] == 3 and report["sequential_seconds"] > 0 < report["sweep_seconds"]
    # one seed: the sweep names its runs by what varies, the norm
    assert sorted(report["sweep_final_test_accuracy"]) == ["norm-bn", "norm-gn", "norm-ln"]
    assert_names_the_machine(report, page.read_text())
