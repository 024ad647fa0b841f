"""The sweep engine: grid, manifest, Ray runs (embedded and on a two-node cluster), aggregation.

Ray start-up dominates the run time, so Ray starts three times in all: once inside
`run_points` (the embedded case, which must stop it again), and once as a two-node
`ray.cluster_utils.Cluster` shared by the module, which the cluster tests join by address and
one test class joins once for several sweeps. Task functions live at module level here: Ray
pickles them by reference, and the workers import this module through PYTHONPATH.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from normcli.errors import NormcliError
from normcli.study import aggregate
from normcli.sweep import (
    MANIFEST_NAME,
    NEEDS_RAY,
    Point,
    claim_sweep,
    compare_manifest,
    create_manifest,
    expand_grid,
    load_manifest,
    open_sweep,
    records,
    resolve_address,
    run_points,
    run_sweep,
    save_payload,
    update_point,
    write_manifest,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# --- tasks run by Ray workers (module level: pickled by reference) ---------------------------


def sleepy(options: dict, output: str) -> dict:
    """Sleep a little, write the options as JSON, report where it ran."""
    import ray

    time.sleep(options.get("sleep", 0.2))
    Path(output).write_text(json.dumps(options))
    return {
        "x": options.get("x"),
        "node": ray.get_runtime_context().get_node_id(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "nice": os.nice(0),
    }


def raises_for_two(options: dict, output: str) -> dict:
    """Fail with a two-line message for x == 2, else behave like `sleepy`."""
    if options["x"] == 2:
        raise ValueError("x must not be 2\nsecond line that must not show")
    return sleepy(options, output)


def dies_once(options: dict, output: str) -> dict:
    """Kill the worker process on the first attempt (marker file absent), then succeed."""
    marker = Path(options["marker"])
    if options.get("x") == 1 and not marker.exists():
        marker.touch()
        os._exit(1)
    return sleepy(options, output)


def always_dies(options: dict, output: str) -> dict:
    """Kill the worker process every time."""
    os._exit(1)


# --- fixtures --------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("workers_import_the_tests")


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """Two Ray nodes of one CPU each on this machine; nothing connected to them."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    small = {"object_store_memory": 100 * 1024**2}
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **small}
    )
    try:
        c.add_node(num_cpus=1, **small)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()  # removes only this cluster's nodes (unlike `ray stop`)


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recorder() -> tuple[list[tuple[str, str, dict]], object]:
    """A list of events and an on_event callback that fills it (checking it runs in this thread)."""
    events: list[tuple[str, str, dict]] = []
    me = threading.get_ident()

    def on_event(kind: str, name: str, info: dict) -> None:
        assert threading.get_ident() == me
        events.append((kind, name, info))

    return events, on_event


# --- grid ------------------------------------------------------------------------------------


def test_grid_order_names_and_options() -> None:
    points = expand_grid({"norm": ["bn", "gn"], "batch_size": [2, 8], "seed": [1]}, {"epochs": 3})
    assert [p.name for p in points] == [
        "norm-bn_batch_size-2_seed-1",
        "norm-bn_batch_size-8_seed-1",
        "norm-gn_batch_size-2_seed-1",
        "norm-gn_batch_size-8_seed-1",
    ]
    assert points[1].options == {"epochs": 3, "norm": "bn", "batch_size": 8, "seed": 1}
    lrs = expand_grid({"lr": [1e-4, 0.01, 0.5, 3e-5, 2.0]}, {})
    assert [p.name for p in lrs] == ["lr-1e-4", "lr-0.01", "lr-0.5", "lr-3e-5", "lr-2"]
    odd = expand_grid({"tag": ["a b/c", ".hidden", "x"], "flag": [True, None]}, {})
    assert len({p.name for p in odd}) == 6
    for p in odd:
        assert "/" not in p.name and " " not in p.name and not p.name.startswith(".")
    assert odd[0].options == {"tag": "a b/c", "flag": True}  # options keep the real values


@pytest.mark.parametrize(
    ("swept", "fixed", "words"),
    [
        ({"seed": []}, {}, ["seed", "empty"]),
        ({"norm": ["bn"], "seed": [1, 2, 1]}, {}, ["seed", "twice"]),
        ({"lr": [0.1, 1, 1.0]}, {}, ["lr", "twice"]),
        ({"norm": ["bn"]}, {"norm": "gn"}, ["norm", "both swept and fixed"]),
        ({"tag": ["a b", "a/b"]}, {}, ["tag-a~b"]),  # different values, same safe name
        ({}, {"epochs": 1}, ["nothing to sweep"]),
        ({"a": list(range(1000)), "b": list(range(1000))}, {}, ["1,000,000 points", "10,000"]),
        ({"seed": [[1], [2], [1]]}, {}, ["seed", "twice"]),  # values a dict cannot hold
    ],
)
def test_grid_refusals(swept: dict, fixed: dict, words: list[str]) -> None:
    with pytest.raises(NormcliError) as err:
        expand_grid(swept, fixed)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "\n" not in str(err.value)


# --- manifest --------------------------------------------------------------------------------


SWEPT = {"norm": ["bn", "gn"], "seed": [1, 2]}
FIXED = {"epochs": 2, "lr": 1e-3}


def test_a_big_grid_is_checked_quickly() -> None:
    """Refused at once above the limit (never expanded); repeats found in one pass below it."""
    started = time.perf_counter()
    with pytest.raises(NormcliError, match="the grid has 10,000,000,000 points"):
        expand_grid({"a": list(range(10**5)), "b": list(range(10**5))}, {})
    with pytest.raises(NormcliError, match="value 0 is given twice"):
        expand_grid({"seed": [*range(9_999), 0]}, {})
    assert len(expand_grid({"seed": list(range(10_000))}, {})) == 10_000
    assert time.perf_counter() - started < 5


def test_a_sweep_folder_is_claimed_once_and_a_new_one_removed_after_a_failure(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), claim_sweep(folder):
        assert folder.is_dir() and (folder / ".manifest.json.lock").exists()
        with claim_sweep(folder):  # the same process again: nested, not refused
            pass
        raise RuntimeError("the sweep failed before writing anything")
    assert list(tmp_path.iterdir()) == []  # both folders made for it are gone again
    with claim_sweep(folder):
        (folder / "manifest.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]  # claim released
    (tmp_path / "file").touch()
    with pytest.raises(NormcliError, match="cannot be made: .*file is not a folder"):
        claim_sweep(tmp_path / "file" / "sweep").__enter__()


def test_manifest_round_trip_and_atomic_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = create_manifest(tmp_path, SWEPT, FIXED, suffix=".json")
    assert load_manifest(tmp_path) == made
    assert made["format"] == 1 and made["swept"] == SWEPT and made["fixed"] == FIXED
    first = made["points"][0]
    assert first == {
        "name": "norm-bn_seed-1",
        "options": {"epochs": 2, "lr": 1e-3, "norm": "bn", "seed": 1},
        "status": "pending",
        "attempts": 0,
        "error": None,
        "output": "norm-bn_seed-1.json",
        "result": None,
    }
    update_point(tmp_path, made, "norm-gn_seed-2", "failed", attempts=1, error="ValueError: no")
    again = load_manifest(tmp_path)
    assert (
        again["points"][3]["status"] == "failed" and again["points"][3]["error"] == "ValueError: no"
    )
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temp file left

    # A write that fails at the last step leaves the old manifest whole and no temp file.
    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(NormcliError, match="cannot write"):
        update_point(tmp_path, again, "norm-bn_seed-1", "done", attempts=1, result={"acc": 1.0})
    monkeypatch.undo()
    assert load_manifest(tmp_path)["points"][0]["status"] == "pending"
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]
    with pytest.raises(NormcliError, match="exists already"):
        create_manifest(tmp_path, SWEPT, FIXED)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (None, "not found"),
        ("{not json", r"not valid JSON \(line 1\)"),
        ("[1, 2]", "not a JSON object"),
        ('{"format": 99}', "format 99"),
        ("bad status", "status must be one of"),
        ("two names", "appears twice"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("deep option", "nested more than 32 levels deep"),
    ],
)
def test_load_manifest_refuses_bad_files(tmp_path: Path, text: str | None, words: str) -> None:
    if text in ("bad status", "two names", "deep option"):
        manifest = create_manifest(tmp_path, SWEPT, FIXED)
        if text == "bad status":
            manifest["points"][0]["status"] = "exploded"
        elif text == "two names":
            manifest["points"][1]["name"] = manifest["points"][0]["name"]
        else:  # deep enough to trouble what reads it, not the JSON parser
            nested: list = []
            for _ in range(900):
                nested = [nested]
            manifest["points"][0]["options"]["lr"] = nested
            (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
        if text != "deep option":
            write_manifest(tmp_path, manifest)
    elif text is not None:
        (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(NormcliError, match=words) as err:
        load_manifest(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str):
    path = tmp_path / MANIFEST_NAME
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    outcome: list = []

    def load() -> None:
        try:
            load_manifest(tmp_path)
        except NormcliError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome, "load_manifest hung"
    assert outcome == [f"{path} is not a regular file; a sweep manifest is one"]
    with pytest.raises(NormcliError, match="not a regular file"):
        open_sweep(tmp_path, SWEPT, FIXED)


def test_manifest_comparison(tmp_path: Path) -> None:
    manifest = create_manifest(tmp_path, SWEPT, FIXED)
    assert compare_manifest(manifest, SWEPT, FIXED) == "resume"
    assert compare_manifest(manifest, {"norm": ["gn", "bn"], "seed": [2, 1]}, FIXED) == "resume"

    bigger = {"norm": ["bn", "gn", "ln"], "seed": [1, 2]}
    with pytest.raises(NormcliError, match="adds 2 runs.*norm-ln_seed-1.*--extend"):
        compare_manifest(manifest, bigger, FIXED)
    assert compare_manifest(manifest, bigger, FIXED, extend=True) == "extend"

    with pytest.raises(NormcliError, match="lacks: norm-gn_seed-1, norm-gn_seed-2"):
        compare_manifest(manifest, {"norm": ["bn"], "seed": [1, 2]}, FIXED, extend=True)
    with pytest.raises(NormcliError, match="lacks: norm-bn_seed-2.*new: norm-bn_seed-3"):
        compare_manifest(manifest, {"norm": ["bn", "gn"], "seed": [1, 3]}, FIXED, extend=True)
    with pytest.raises(NormcliError, match=r"fixed options: lr \(0.001 there, 0.01 now\)"):
        compare_manifest(manifest, bigger, {**FIXED, "lr": 0.01}, extend=True)
    with pytest.raises(NormcliError, match=r"wd \(unset there, 0.1 now\)"):
        compare_manifest(manifest, SWEPT, {**FIXED, "wd": 0.1})

    with pytest.raises(NormcliError, match="sweeps norm, seed; this request sweeps norm, wd"):
        compare_manifest(manifest, {"norm": ["bn", "gn"], "wd": [0.1]}, FIXED, extend=True)

    # Extending keeps what the old points did and adds the new ones as pending.
    update_point(tmp_path, manifest, "norm-gn_seed-1", "done", attempts=1, result={"acc": 0.9})
    extended, action = open_sweep(tmp_path, bigger, FIXED, extend=True)
    assert action == "extend" and load_manifest(tmp_path) == extended
    by_name = {e["name"]: e for e in extended["points"]}
    assert len(by_name) == 6 and by_name["norm-gn_seed-1"]["result"] == {"acc": 0.9}
    assert by_name["norm-ln_seed-2"]["status"] == "pending"
    assert open_sweep(tmp_path, bigger, FIXED)[1] == "resume"


# --- aggregation -----------------------------------------------------------------------------


def test_aggregate_against_statistics() -> None:
    rows = [
        {"norm": "gn", "batch_size": 64, "seed": 1, "acc": 0.91, "loss": 0.30},
        {"norm": "bn", "batch_size": 64, "seed": 1, "acc": 0.95, "loss": 0.20},
        {"norm": "bn", "batch_size": 8, "seed": 1, "acc": 0.80},
        {"norm": "gn", "batch_size": 64, "seed": 2, "acc": 0.89, "loss": 0.33},
        {"norm": "bn", "batch_size": 64, "seed": 2, "acc": 0.97, "loss": 0.18},
        {"norm": "bn", "batch_size": 64, "seed": 3, "acc": 0.96},  # no loss: skipped for loss only
        {"norm": "bn", "batch_size": 8, "seed": 2, "acc": 0.84, "loss": None},
    ]
    table = aggregate(rows, ["norm"], ["acc", "loss"])
    assert [r["norm"] for r in table] == ["gn", "bn"]  # first seen
    for row in table:
        members = [r for r in rows if r["norm"] == row["norm"]]
        for metric in ("acc", "loss"):
            values = [r[metric] for r in members if r.get(metric) is not None]
            got = row[metric]
            assert got["n"] == len(values)
            assert math.isclose(got["mean"], statistics.mean(values), rel_tol=1e-12)
            assert math.isclose(got["std"], statistics.stdev(values), rel_tol=1e-12)
            assert (got["min"], got["max"]) == (min(values), max(values))

    by_size = aggregate(rows, ["norm", "batch_size"], ["loss"])
    assert [(r["norm"], r["batch_size"]) for r in by_size] == [
        ("gn", 64), ("bn", 8), ("bn", 64),
    ]  # fmt: skip
    assert by_size[1]["loss"] == {
        "n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None
    }  # fmt: skip
    one = aggregate(rows[:1], ["seed"], ["acc"])[0]["acc"]
    assert one == {"n": 1, "mean": 0.91, "std": None, "min": 0.91, "max": 0.91, "ci95": None}
    assert [r["seed"] for r in aggregate(rows, ["seed"], ["acc"])] == [1, 2, 3]  # numeric

    with pytest.raises(NormcliError, match="unknown group key width; available: norm, batch_size"):
        aggregate(rows, ["width"], ["acc"])
    with pytest.raises(NormcliError, match="unknown metric acccuracy"):
        aggregate(rows, ["norm"], ["acccuracy"])
    assert aggregate([], ["norm"], ["acc"]) == []


# --- engine without Ray running --------------------------------------------------------------


def test_import_without_ray_and_the_install_hint(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import normcli.sweep as s\n"
        "from normcli.errors import NormcliError\n"
        "try:\n"
        "    s.run_points([s.Point('a', {})], print, folder='.')\n"
        "except NormcliError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == NEEDS_RAY


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"workers": 0}, "workers must be"),
        ({"cpus_per_run": 0}, "cpus_per_run must be"),
        ({"gpus_per_run": -1.0}, "gpus_per_run must be"),
        ({"gpus_per_run": float("nan")}, "gpus_per_run must be"),
        ({"gpus_per_run": 1.5}, "gpus_per_run above 1 must be a whole number"),
        ({"max_retries": -1}, "max_retries must be"),
        ({"workers": 10**6}, "this machine has"),
        ({"folder": "/no/such/folder"}, "does not exist"),
        ({"suffix": "/x.json"}, "suffix"),
    ],
)
def test_engine_refuses_bad_settings(tmp_path: Path, kwargs: dict, words: str) -> None:
    with pytest.raises(NormcliError, match=words):
        run_points([Point("a", {})], sleepy, **{"folder": tmp_path, **kwargs})


def test_address_that_does_not_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(NormcliError, match=f"no Ray cluster at 127.0.0.1:{port}") as err:
        run_points(
            [Point("a", {})], sleepy, folder=tmp_path, address=f"127.0.0.1:{port}",
            connect_timeout=5,
        )  # fmt: skip
    assert time.monotonic() - started < 5 and "\n" not in str(err.value)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no ray_current_cluster file here
    with pytest.raises(NormcliError, match="no running Ray cluster found"):
        resolve_address("auto")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    assert resolve_address("auto") == ("127.0.0.1", port)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_address("auto") == ("10.1.2.3", 6379)
    for bad in ("ray://10.1.2.3:10001", "10.1.2.3", "host:port", "[::1]:0"):
        with pytest.raises(NormcliError, match="Ray"):
            resolve_address(bad)
    assert resolve_address("[::1]:6379") == ("::1", 6379)


def test_address_that_listens_but_is_not_ray(tmp_path: Path) -> None:
    """ray.init would retry for minutes against a silent port: the guard gives up on time.

    In a subprocess, because the abandoned ray.init keeps running in a thread until exit.
    """
    code = (
        "import socket, time\n"
        "import normcli.sweep as s\n"
        "from normcli.errors import NormcliError\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    s.run_points([s.Point('a', {})], print, folder='.',\n"
        "                 address='127.0.0.1:%d' % srv.getsockname()[1], connect_timeout=2)\n"
        "except NormcliError as e:\n"
        "    print('%.1f' % (time.monotonic() - t), e)\n"
    )
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    seconds, message = out.stdout.strip().split(" ", 1)
    assert float(seconds) < 10 and "did not answer within 2 s" in message  # bounded, busy CI
    assert time.monotonic() - started < 60  # and the process still exits


def test_save_payload_writes_only_a_missing_or_different_file(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    assert save_payload(path, b"abc") and path.read_bytes() == b"abc"
    assert not save_payload(path, b"abc")
    assert save_payload(path, b"abd") and path.read_bytes() == b"abd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


# --- engine on Ray ---------------------------------------------------------------------------


def test_sweep_on_its_own_embedded_ray(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    points = expand_grid({"x": [1, 2, 3, 4]}, {"sleep": 0.2})
    events, on_event = recorder()
    outcomes = run_points(
        points, sleepy, folder=tmp_path, suffix=".json", workers=2, on_event=on_event
    )
    assert not ray.is_initialized()  # started for this sweep, stopped after it

    assert {name: o.status for name, o in outcomes.items()} == {p.name: "done" for p in points}
    for p in points:
        assert json.loads((tmp_path / f"{p.name}.json").read_text()) == p.options
        assert outcomes[p.name].result["x"] == p.options["x"]
        assert outcomes[p.name].result["omp"] == "1"  # one thread per reserved CPU
        # Ray's default niceness (15) would starve the runs beside any other work (measured:
        # a 2-second run took 90 s beside three trainings on 2 cores).
        assert outcomes[p.name].result["nice"] == os.nice(0)
        assert outcomes[p.name].attempts == 1
    assert [e[1] for e in events if e[0] == "started"] == [p.name for p in points]
    assert sorted(e[1] for e in events if e[0] == "finished") == sorted(p.name for p in points)
    running, most = set(), 0
    for kind, name, _ in events:
        running = running | {name} if kind == "started" else running - {name}
        most = max(most, len(running))
    assert most == 2  # never more in flight than workers


def test_two_node_cluster_by_address(
    cluster: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    points = expand_grid({"x": [1, 2, 3, 4]}, {"sleep": 0.5})
    events, on_event = recorder()
    outcomes = run_points(
        points, sleepy, folder=tmp_path, suffix=".json", address=cluster.address, on_event=on_event
    )
    assert not ray.is_initialized()  # the driver left; the cluster stays up
    assert all(o.status == "done" for o in outcomes.values())
    assert len({o.result["node"] for o in outcomes.values()}) == 2  # both nodes ran points
    for p in points:
        assert json.loads((tmp_path / f"{p.name}.json").read_text()) == p.options

    with pytest.raises(NormcliError, match="no Ray node has 2 CPUs"):
        run_points(points, sleepy, folder=tmp_path, address=cluster.address, cpus_per_run=2)
    assert not ray.is_initialized()


def test_fresh_process_joins_by_auto(cluster: object, tmp_path: Path) -> None:
    """As the CLI will: a new process, RAY_ADDRESS set, RAY_AUTH_MODE unset.

    After this module's embedded run, the cluster has token authentication on (Ray's default
    once ~/.ray/auth_token exists); a fresh driver given an address must still get in.
    """
    code = (
        "import sys, json, test_sweep_engine as t, normcli.sweep as s\n"
        "out = s.run_points([s.Point('a', {'x': 7})], t.sleepy, folder='.', suffix='.json',\n"
        "                   address='auto', connect_timeout=30)\n"
        "print(json.dumps({k: v.status for k, v in out.items()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["RAY_ADDRESS"] = cluster.address
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"a": "done"}
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 7}


@pytest.fixture(scope="class")
def connected(cluster: object) -> Iterator[None]:
    """This process joined to the cluster for a whole test class."""
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.usefixtures("connected")
class TestOnAConnectedRay:
    """Sweeps in a process already connected to Ray: the engine uses it and leaves it running."""

    def test_killed_worker_is_retried(self, tmp_path: Path) -> None:
        import ray

        points = expand_grid({"x": [1, 2]}, {"marker": str(tmp_path / "died"), "sleep": 0.1})
        outcomes = run_points(points, dies_once, folder=tmp_path, suffix=".json", max_retries=2)
        assert ray.is_initialized()
        assert (tmp_path / "died").exists()  # the first attempt did die
        assert outcomes["x-1"].status == "done" and outcomes["x-1"].attempts == 2
        assert outcomes["x-2"].status == "done" and outcomes["x-2"].attempts == 1
        assert (tmp_path / "x-1.json").exists()

        dead = run_points(points[:1], always_dies, folder=tmp_path, max_retries=0)["x-1"]
        assert dead.status == "failed" and dead.attempts == 1
        assert dead.error.startswith("WorkerCrashedError") and "\n" not in dead.error

    def test_exception_fails_only_its_point(self, tmp_path: Path) -> None:
        points = expand_grid({"x": [1, 2, 3]}, {"sleep": 0.1})
        events, on_event = recorder()
        outcomes = run_points(
            points, raises_for_two, folder=tmp_path, suffix=".json", on_event=on_event
        )
        assert outcomes["x-2"].status == "failed"
        assert outcomes["x-2"].error == "ValueError: x must not be 2"
        assert outcomes["x-2"].attempts == 1  # task exceptions are not retried
        assert outcomes["x-1"].status == outcomes["x-3"].status == "done"
        assert ("failed", "x-2", {"error": "ValueError: x must not be 2", "attempts": 1}) in events
        assert not (tmp_path / "x-2.json").exists() and (tmp_path / "x-3.json").exists()

    def test_output_comes_back_from_a_node_without_the_folder(self, tmp_path: Path) -> None:
        """A run on another node whose sweep folder is missing there: its bytes come back."""
        import ray

        from normcli.sweep.engine import _run_point

        missing = str(tmp_path / "not-on-that-node" / "a.json")
        body = ray.remote(_run_point).options(num_cpus=1)
        value = ray.get(body.remote(sleepy, {"x": 5, "sleep": 0}, missing, 1, "another-node"))
        assert value["ok"] and value["result"]["x"] == 5
        assert json.loads(value["payload"]) == {"x": 5, "sleep": 0}
        assert not Path(missing).parent.exists()
        assert save_payload(tmp_path / "a.json", value["payload"])

    def test_run_sweep_keeps_the_manifest(self, tmp_path: Path) -> None:
        manifest, action = open_sweep(tmp_path, {"x": [1, 2, 3]}, {"sleep": 0.1}, suffix=".json")
        assert action == "new"
        run_sweep(tmp_path, raises_for_two)
        entries = {e["name"]: e for e in load_manifest(tmp_path)["points"]}
        assert {n: e["status"] for n, e in entries.items()} == {
            "x-1": "done", "x-2": "failed", "x-3": "done",
        }  # fmt: skip
        assert entries["x-2"]["error"] == "ValueError: x must not be 2"
        assert entries["x-1"]["attempts"] == 1 and entries["x-1"]["result"]["x"] == 1

        # Resume: only the failed point runs again; extend adds x=4 as pending and runs it.
        manifest, action = open_sweep(tmp_path, {"x": [1, 2, 3, 4]}, {"sleep": 0.1}, extend=True)
        assert action == "extend"
        events, on_event = recorder()
        run_sweep(tmp_path, raises_for_two, on_event=on_event)
        assert sorted(e[1] for e in events if e[0] == "started") == ["x-2", "x-4"]
        entries = {e["name"]: e for e in load_manifest(tmp_path)["points"]}
        assert entries["x-2"]["attempts"] == 2 and entries["x-4"]["status"] == "done"
        table = aggregate(records(load_manifest(tmp_path)), ["sleep"], ["x"])
        assert table == [{"sleep": 0.1, "x": {"n": 3, "mean": 8 / 3, "std": table[0]["x"]["std"],
                                              "min": 1, "max": 4,
                                              "ci95": table[0]["x"]["ci95"]}}]  # fmt: skip
        assert math.isclose(table[0]["x"]["std"], statistics.stdev([1, 3, 4]))
        # t(0.975, 2) = 4.302653 (tables): the interval is mean ± t * std / sqrt(3)
        half = 4.302653 * statistics.stdev([1, 3, 4]) / math.sqrt(3)
        assert table[0]["x"]["ci95"] == pytest.approx([8 / 3 - half, 8 / 3 + half], rel=1e-6)
