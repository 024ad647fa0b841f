"""The per-CPU choice of precision and layout (normcli.tuning) and OpenMP's spin per situation
(normcli.runtime)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from normcli import runtime, tuning
from normcli.config import RunSpec
from normcli.tuning import CpuFacts, choose, cpu_facts

CPU = torch.device("cpu")
AMX = CpuFacts("Intel(R) Xeon(R) Platinum 8480+", frozenset({"avx512f", "amx_tile", "amx_bf16"}))
AVX512_BF16 = CpuFacts("AMD EPYC 9654", frozenset({"avx512f", "avx512_bf16"}))
NO_BF16 = CpuFacts("AMD EPYC 7B13", frozenset({"avx2", "fma"}))


def spec(**options: object) -> RunSpec:
    return RunSpec.from_options(dataset="mnist", batch_size=16, **options).resolve()


def test_cpu_facts_read_the_first_processor_of_cpuinfo() -> None:
    text = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 amx_bf16\n"
        "\nprocessor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    facts = cpu_facts(text)
    assert facts.model_name == "Intel(R) Xeon(R) Processor"
    assert facts.flags == {"fpu", "avx2", "amx_bf16"} and facts.native_bf16
    assert facts.torch_version == torch.__version__
    assert not cpu_facts("processor : 0\nflags : fpu avx2\n").native_bf16


def test_auto_precision_is_bf16_where_the_flags_say_so_and_fp32_elsewhere() -> None:
    for facts, want in ((AMX, "bf16"), (AVX512_BF16, "bf16"), (NO_BF16, "fp32")):
        choice = choose(spec(), CPU, facts, measure=False)
        assert (choice.precision, choice.how) == (want, "hardware"), facts
    # An explicit precision is kept whatever the CPU; both given: nothing decided.
    assert choose(spec(precision="bf16"), CPU, NO_BF16, measure=False).precision == "bf16"
    given = choose(spec(precision="fp32", channels_last=False), CPU, AMX, measure=False)
    assert (given.precision, given.channels_last, given.how) == ("fp32", False, "given")


def test_without_a_trial_the_layout_is_the_norms() -> None:
    layouts = {n: choose(spec(norm=n), CPU, NO_BF16, measure=False).channels_last
               for n in ("bn", "gn", "ln")}  # fmt: skip
    assert layouts == {"bn": True, "gn": False, "ln": True}


class FakeTrial:
    """Stands for the timed trial: fixed images/s per option, and the calls made."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table, self.calls = table, []

    def __call__(self, model, batch, options, seconds=1.0) -> dict[str, float]:
        self.calls.append((model.model, model.norm, batch, list(options)))
        return {tuning.option_label(*o): self.table[tuning.option_label(*o)] for o in options}


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "normcli" / "tuning"


def test_the_trial_picks_the_fastest_option_and_its_cache_is_written_reused_and_per_cpu(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = FakeTrial({"bf16 channels_last": 100.0, "bf16 contiguous": 300.0,
                       "fp32 channels_last": 200.0, "fp32 contiguous": 50.0})  # fmt: skip
    monkeypatch.setattr(tuning, "measure_options", trial)
    run = spec(norm="gn")
    first = choose(run, CPU, AMX, measure=True)
    assert (first.precision, first.channels_last, first.how) == ("bf16", False, "measured")
    assert trial.calls == [("mnist_net", "gn", 16, [("bf16", True), ("bf16", False),
                                                    ("fp32", True), ("fp32", False)])]  # fmt: skip
    [path] = cache_home.iterdir()
    doc = json.loads(path.read_text())
    assert doc["key"] == tuning.cache_key(run, AMX) and doc["key"]["cpu"] == AMX.model_name
    assert doc["images_per_second"] == trial.table

    again = choose(run, CPU, AMX, measure=True)  # same CPU and run: the file answers
    assert (again.precision, again.channels_last, again.how) == ("bf16", False, "cached")
    assert len(trial.calls) == 1
    fixed = choose(spec(norm="gn", precision="fp32"), CPU, AMX, measure=True)
    assert (fixed.precision, fixed.channels_last, fixed.how) == ("fp32", True, "cached")

    other = CpuFacts("Intel(R) Xeon(R) Gold 6430", AMX.flags)  # another CPU model: measured
    assert choose(run, CPU, other, measure=True).how == "measured"
    assert len(trial.calls) == 2 and len(list(cache_home.iterdir())) == 2
    no_bf16 = choose(run, CPU, NO_BF16, measure=True)  # only fp32 is timed there
    assert trial.calls[-1][3] == [("fp32", True), ("fp32", False)]
    assert (no_bf16.precision, no_bf16.channels_last) == ("fp32", True)


def test_explicit_options_and_the_environment_skip_the_trial(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = FakeTrial({})
    monkeypatch.setattr(tuning, "measure_options", trial)
    choose(spec(precision="bf16", channels_last=True), CPU, AMX, measure=True)
    monkeypatch.setenv(tuning.TUNE_ENV, "0")
    assert choose(spec(), CPU, AMX).how == "hardware"
    assert trial.calls == [] and not cache_home.exists()


def test_a_damaged_cache_file_is_measured_again(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = FakeTrial({"fp32 channels_last": 2.0, "fp32 contiguous": 1.0})
    monkeypatch.setattr(tuning, "measure_options", trial)
    key = tuning.cache_key(spec(), NO_BF16)
    tuning.cache_path(key).parent.mkdir(parents=True)
    tuning.cache_path(key).write_text('{"key": 1, "images_per_second": {"fp32 contiguous": -1}}')
    assert choose(spec(), CPU, NO_BF16, measure=True).how == "measured"
    assert tuning.read_cache(key) == trial.table


def test_the_real_trial_times_every_option_and_keeps_the_global_rng() -> None:
    model = spec().model
    before = torch.get_rng_state()
    table = tuning.measure_options(model, 8, [("fp32", True), ("bf16", False)], seconds=0.0)
    assert set(table) == {"fp32 channels_last", "bf16 contiguous"}
    assert all(v > 0 for v in table.values())
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    ("argv", "environ", "want"),
    [
        (["train", "--dataset", "mnist"], {}, None),  # lone: libgomp's default
        (["train", "--threads", "2"], {}, None),  # every core
        (["train", "--threads", "1"], {}, "1000"),  # fewer threads than cores: others run
        (["train", "--threads=1"], {}, "1000"),
        ([], {"OMP_NUM_THREADS": "1"}, "1000"),
        (["--debug", "sweep", "--out", "s"], {}, "1000"),
        (["train", "--out", "sweep"], {}, None),  # a file named sweep is no sweep
        (["train", "--nproc", "2"], {}, "1000"),
        (["train", "--nproc", "1"], {}, None),
        (["train"], {"WORLD_SIZE": "2"}, "1000"),  # a worker of a launcher
        (["sweep"], {"GOMP_SPINCOUNT": "5"}, None),  # the user's own setting stays
        (["train", "--threads", "1"], {"OMP_WAIT_POLICY": "PASSIVE"}, None),
    ],
)
def test_spin_per_situation(argv: list[str], environ: dict[str, str], want: str | None) -> None:
    assert runtime.spin_count(argv, environ, cores=2) == want


def test_configure_threads_sets_the_spin_of_the_situation(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*runtime.SPIN_SETTINGS, "OMP_NUM_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sys.argv", ["normcli", "sweep", "--out", "x"])
    runtime.configure_threads()
    assert os.environ["GOMP_SPINCOUNT"] == runtime.SPIN_COUNT == "1000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    runtime.configure_threads(packed=False)
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    runtime.configure_threads(packed=True)
    assert "GOMP_SPINCOUNT" not in os.environ
