"""A hostile first hour: odd output paths, special files, full disks, signals, odd locales and
terminals, markup and mathtext in file names, and the small things users hit first.

Sections follow the families of problems: outputs, special files and claims, signals,
environment, text as data, first-minute details, plots. Subprocess tests run
`python -m normcli` as a user would; each costs a torch import (seconds), so they are few.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import save_file

import normcli
from normcli import checkpoint, plots
from normcli.checkpoint import read_file, save_checkpoint
from normcli.errors import NormcliError
from normcli.files import atomic_write, check_writable, exclusive_output
from normcli.history import history_columns
from normcli.outputs import plan_outputs

PNG, PDF, SVG = b"\x89PNG", b"%PDF", b"<?xml"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(normcli.__file__).resolve().parents[1])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("NORMCLI_DATA", None)
    env.pop("COLUMNS", None)
    env.update(extra)
    return env


def _normcli(*args: str | Path, **kwargs) -> subprocess.CompletedProcess[bytes]:
    """`python -m normcli ARGS` to completion; stdout and stderr as bytes."""
    env = _env(**kwargs.pop("env", {}))
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [sys.executable, "-m", "normcli", *map(str, args)],
        env=env, stderr=subprocess.PIPE, timeout=120, **kwargs,
    )  # fmt: skip


def _variant(source: Path, dest: Path, class_names: list[str] | None = None) -> Path:
    """A copy of a checkpoint under another name, optionally with other class names."""
    raw, tensors = read_file(source)
    raw = dict(raw or {})
    if class_names is not None:
        raw["class_names"] = json.dumps(class_names)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest), metadata=raw)
    return dest


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any evaluation or figure fail loudly: a refusal must come before the work."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the outputs were checked")

    import normcli.evaluate

    monkeypatch.setattr(normcli.evaluate, "test_splits", forbidden)
    monkeypatch.setattr(plots, "curves_figure", forbidden)


# --- 1. outputs --------------------------------------------------------------------------------


def test_out_ending_in_a_slash_creates_the_folder_for_every_command(
    cli, tiny_data, tiny_checkpoints, tmp_path
):
    ckpt = tiny_checkpoints["gn"]
    runs = {
        "plot": (["plot", ckpt, "--out", f"{tmp_path}/figs/curves/"], ["curves.png"]),
        "misclassified": (
            ["misclassified", ckpt, "--data-dir", tiny_data, "--out", f"{tmp_path}/grids/"],
            ["gn_misclassified_n10_index.png"],
        ),
        "eval": (
            ["eval", ckpt, "--data-dir", tiny_data, "--json", "--confusion", f"{tmp_path}/cm/"],
            ["gn_confusion.png"],
        ),
    }
    for args, names in runs.values():
        folder = Path(str(args[-1]))
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        assert sorted(p.name for p in folder.iterdir()) == names  # no lock file left behind
        assert all((folder / n).read_bytes().startswith(PNG) for n in names)
        assert str(folder / names[0]) in result.stdout.splitlines()


def test_several_outputs_go_into_a_new_folder_without_a_slash(cli, tiny_checkpoints, tmp_path):
    paths = [tiny_checkpoints["bn_l1"], tiny_checkpoints["ln"]]
    out = tmp_path / "a" / "b"
    result = cli("plot", *paths, "--metric", "test_loss", "--metric", "lr", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(out / "test_loss.png"), str(out / "lr.png")]
    assert sorted(p.name for p in out.iterdir()) == ["lr.png", "test_loss.png"]


def test_the_folder_is_not_created_when_a_later_check_fails(
    cli, tiny_data, tiny_checkpoints, tmp_path
):
    ckpt = tiny_checkpoints["gn"]
    empty = tmp_path / "no-data"
    empty.mkdir()
    for args in (
        ["eval", ckpt, "--data-dir", empty, "--confusion", f"{tmp_path}/cm/"],
        ["misclassified", ckpt, "--data-dir", empty, "--out", f"{tmp_path}/grids/"],
    ):
        result = cli(*args)
        assert result.exit_code == 2, result.stderr
        assert not Path(str(args[-1])).exists()


def test_a_failed_write_removes_the_folder_it_created(cli, tiny_checkpoints, tmp_path, monkeypatch):
    def full_disk(fig, path, fmt=None):
        raise NormcliError(f"no space left on {path}")

    monkeypatch.setattr(plots, "save_figure", full_disk)
    result = cli("plot", tiny_checkpoints["gn"], "--out", f"{tmp_path}/new/")
    assert result.exit_code == 2
    assert not (tmp_path / "new").exists()


def test_a_file_where_a_folder_is_needed_is_refused(cli, tiny_checkpoints, tmp_path):
    file = tmp_path / "taken"
    file.write_bytes(b"x")
    args = ["plot", tiny_checkpoints["gn"], "--metric", "lr", "--metric", "test_loss"]
    for out in (file, f"{file}/"):
        result = cli(*args, "--out", out)
        assert result.exit_code == 2
        assert "is a file" in result.stderr
    assert file.read_bytes() == b"x"


def test_misclassified_default_names_record_n_and_sort(cli, tiny_data, tiny_checkpoints, tmp_path):
    ckpt = _variant(tiny_checkpoints["ln"], tmp_path / "run.safetensors")
    first = cli("misclassified", ckpt, "--data-dir", tiny_data, "--n", "4")
    second = cli("misclassified", ckpt, "--data-dir", tiny_data, "--n", "6", "--sort", "confidence")
    as_json = cli("misclassified", ckpt, "--data-dir", tiny_data, "--n", "5", "--json")
    assert first.exit_code == second.exit_code == as_json.exit_code == 0, second.stderr
    assert first.stdout.strip() == str(tmp_path / "run_misclassified_n4_index.png")
    assert second.stdout.strip() == str(tmp_path / "run_misclassified_n6_confidence.png")
    # --json lists the images on stdout, and still writes the grid (the command's product).
    doc = json.loads(as_json.stdout)
    grid = tmp_path / "run_misclassified_n5_index.png"
    assert doc[0]["output"] == str(grid) and grid.read_bytes().startswith(PNG)
    assert (tmp_path / "run_misclassified_n4_index.png").read_bytes().startswith(PNG)


# The rule, for every command: png, svg and pdf in any case are accepted (written in that format
# under the name given); any other extension, or none, is refused before any work.
COMMANDS = {
    "plot": lambda c, d, out: ["plot", c, "--out", out],
    "misclassified": lambda c, d, out: ["misclassified", c, "--data-dir", d, "--out", out],
    "eval": lambda c, d, out: ["eval", c, "--data-dir", d, "--confusion", out],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("name", "magic"), [("x.PNG", PNG), ("x.Pdf", PDF), ("x.SVG", SVG)])
def test_upper_case_extensions_of_known_formats_are_written_in_that_format(
    cli, tiny_data, tiny_checkpoints, tmp_path, command, name, magic
):
    out = tmp_path / name
    result = cli(*COMMANDS[command](tiny_checkpoints["gn"], tiny_data, out))
    assert result.exit_code == 0, result.stderr
    assert str(out) in result.stdout.splitlines()
    assert out.read_bytes().startswith(magic)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("name", "message"),
    [("x.jpg2", "unknown image format '.jpg2'; use png, svg or pdf"), ("x", "no image extension")],
)
def test_unknown_or_missing_extensions_are_refused_before_any_work(
    cli, tiny_data, tiny_checkpoints, tmp_path, monkeypatch, command, name, message
):
    _no_work(monkeypatch)
    result = cli(*COMMANDS[command](tiny_checkpoints["gn"], tiny_data, tmp_path / name))
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plot_refuses_an_out_that_contradicts_format(cli, tiny_checkpoints, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    result = cli("plot", tiny_checkpoints["gn"], "--out", tmp_path / "c.svg", "--format", "png")
    assert result.exit_code == 2
    assert "names a svg file, but --format is png" in result.stderr


# --- 2. special files, full disks, claims ------------------------------------------------------


def _special_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    found = {"fifo": fifo, "directory": folder}
    # A link to /dev/null: were it ever replaced, the link would go, never /dev/null itself.
    found["link-to-char-device"] = tmp_path / "null.png"
    found["link-to-char-device"].symlink_to(os.devnull)
    found["link-to-fifo"] = tmp_path / "tofifo.png"
    found["link-to-fifo"].symlink_to(fifo)
    found["link-to-directory"] = tmp_path / "todir.png"
    found["link-to-directory"].symlink_to(folder)
    try:  # a private character device (root only): the same as /dev/full, in the test's folder
        os.mknod(tmp_path / "full.png", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        found["char-device"] = tmp_path / "full.png"
    except OSError:
        pass
    return found


def _kinds(tmp_path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.lstat().st_mode, p.lstat().st_ino) for p in tmp_path.iterdir()}


def test_only_regular_files_are_ever_replaced(tmp_path: Path) -> None:
    specials = _special_files(tmp_path)
    before = _kinds(tmp_path)
    for kind, path in specials.items():
        with pytest.raises(NormcliError) as refused:
            check_writable(path)
        message = str(refused.value)
        assert "directory" in message if "directory" in kind else "not a regular file" in message
        with pytest.raises(NormcliError):
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new"))
        if "directory" not in kind:  # an existing folder as --out means "write inside it"
            with pytest.raises(NormcliError):
                plan_outputs(path, [tmp_path / "default.png"], overwrite=True)
    assert _kinds(tmp_path) == before  # nothing replaced, no temporary file left


def test_the_cli_refuses_special_files_even_with_overwrite(
    cli, tiny_data, tiny_checkpoints, tmp_path
):
    specials = _special_files(tmp_path)
    before = _kinds(tmp_path)
    for path in (specials["link-to-char-device"], specials["fifo"]):
        for args in (
            ["plot", tiny_checkpoints["gn"], "--out", path, "--overwrite"],
            ["eval", tiny_checkpoints["gn"], "--data-dir", tiny_data, "--confusion", path,
             "--overwrite"],
            ["train", "--data-dir", tiny_data, "--epochs", "1", "--out", path, "--overwrite"],
        ):  # fmt: skip
            result = cli(*args)
            assert result.exit_code == 2, result.stderr
            assert result.stderr.startswith(f"normcli: error: {path}: is ")
            assert result.stderr.count("\n") == 1 and "not a regular file" in result.stderr
    assert _kinds(tmp_path) == before


def test_a_full_disk_says_so_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")

    def half_then_full(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(NormcliError, match=f"^no space left on {path}"):
        atomic_write(path, half_then_full)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_a_full_disk_while_saving_a_checkpoint(tiny_checkpoints, tmp_path, monkeypatch) -> None:
    from safetensors import SafetensorError

    from normcli.checkpoint import load_checkpoint

    def full(tensors, filename, metadata=None):  # what safetensors raises on a full disk
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    saved = load_checkpoint(tiny_checkpoints["gn"])
    monkeypatch.setattr(checkpoint, "save_file", full)
    path = tmp_path / "run.safetensors"
    with pytest.raises(NormcliError, match=f"^no space left on {path}"):
        save_checkpoint(path, saved.model, saved.meta)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_through_the_cli_is_one_line(cli, tiny_checkpoints, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full(self, fname, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    out = tmp_path / "c.png"
    result = cli("plot", tiny_checkpoints["gn"], "--out", out)
    assert result.exit_code == 2
    assert result.stderr == f"normcli: error: no space left on {out} (No space left on device)" \
        "; nothing was written\n"  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def _claim(path: str, start, hold, results) -> None:
    """Claim `path` (after `start`, a barrier, if any); the winner holds it until `hold`."""
    if start is not None:
        start.wait(30)
    try:
        with exclusive_output(path):
            results.put(("ok", os.getpid()))
            hold.wait(30)
    except NormcliError as e:
        results.put(("refused", str(e)))


def test_a_second_process_cannot_claim_a_held_output(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "run.safetensors")
    hold, results = ctx.Event(), ctx.Queue()
    first = ctx.Process(target=_claim, args=(path, None, hold, results))
    first.start()
    assert results.get(timeout=30) == ("ok", first.pid)
    second = ctx.Process(target=_claim, args=(path, None, hold, results))
    second.start()
    outcome, message = results.get(timeout=30)
    hold.set()
    first.join(30)
    second.join(30)
    assert outcome == "refused"
    assert message == f"{path} is being written by another normcli process (pid {first.pid})"
    assert list(tmp_path.iterdir()) == []  # the lock file is gone
    with exclusive_output(path):  # and the path can be claimed again
        assert (tmp_path / ".run.safetensors.lock").read_text() == f"{os.getpid()}\n"


def test_processes_started_together_let_exactly_one_claim(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "fig.png")
    start, hold, results = ctx.Barrier(4), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(path, start, hold, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=30)[0] for _ in procs)
    hold.set()
    for p in procs:
        p.join(30)
    assert outcomes == ["ok", "refused", "refused", "refused"]
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_claimant_left_is_removed_unless_the_claim_is_held(tmp_path: Path) -> None:
    """A sweep's run killed while writing (Ctrl-C's grace over) leaves its claim's lock file
    and a temporary file: the driver removes them once no live process holds the claim."""
    import fcntl

    from normcli.files import release_stale_claim

    path = tmp_path / "run.safetensors"
    leftovers = [".run.safetensors.lock", ".run.safetensors.x1.tmp"]

    def killed_while_writing() -> None:
        with exclusive_output(path):
            (tmp_path / leftovers[1]).write_bytes(b"half a checkpoint")
            os._exit(9)

    child = multiprocessing.get_context("fork").Process(target=killed_while_writing)
    child.start()
    child.join(30)
    assert sorted(p.name for p in tmp_path.iterdir()) == leftovers
    fd = os.open(tmp_path / leftovers[0], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live holder
    release_stale_claim(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == leftovers  # not touched
    os.close(fd)
    release_stale_claim(path)
    assert list(tmp_path.iterdir()) == []
    release_stale_claim(path)  # nothing there: nothing to do


def test_a_checkpoint_another_run_wrote_meanwhile_is_kept(
    cli, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two trainings with one --out (two `train --nproc` runs check it seconds before rank 0
    claims it): the one that claims second finds the other's finished file and stops."""
    import normcli.train

    out = tmp_path / "run.safetensors"
    start_run = normcli.train.start_run

    def while_another_run_finishes(*args: object, **kwargs: object) -> object:
        run = start_run(*args, **kwargs)
        out.write_bytes(b"the other run's checkpoint")
        return run

    monkeypatch.setattr(normcli.train, "start_run", while_another_run_finishes)
    result = cli("train", "--data-dir", tiny_data, "--epochs", "1", "--batch-size", "50",
                 "--device", "cpu", "--out", out)  # fmt: skip
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"normcli: error: {out} was written by another run meanwhile; pass --overwrite to "
        "replace it, or --out elsewhere\n"
    )
    assert out.read_bytes() == b"the other run's checkpoint"
    assert list(tmp_path.iterdir()) == [out]  # no claim or temporary file left


# --- 3. signals and start-up -------------------------------------------------------------------


def _wait_for_torch(proc: subprocess.Popen) -> None:
    """Wait until the child is importing torch (its libraries are mapped), up to 60 s."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.005)
    pytest.fail("the child never started importing torch")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGINT, 130, "normcli: error: interrupted\n"),
        (signal.SIGTERM, 143, "normcli: error: interrupted (SIGTERM)\n"),
    ],
)
def test_a_signal_during_the_imports_is_one_line(sig, code, line) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "normcli", "summary", "--model", "mnist_net"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_torch(proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err, out) == (code, line, "")


def test_sigterm_during_training_is_an_interrupt_with_the_resume_hint(tmp_path: Path) -> None:
    from normcli.checkpoint import read_metadata
    from normcli.data import write_synthetic

    data = write_synthetic("mnist", tmp_path / "data", n_train=600, n_test=100)
    ckpt = tmp_path / "run.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "normcli", "train", "--data-dir", str(data), "--epochs", "50",
         "--batch-size", "16", "--device", "cpu", "--out", str(ckpt)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if read_metadata(ckpt).history:
                    break
            except NormcliError:
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and out == ""
    errors = [line for line in err.splitlines() if line.startswith("normcli: error:")]
    assert len(errors) == 1 and f"--resume {ckpt}" in errors[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run.safetensors"]  # no temp
    assert read_metadata(ckpt).resume is not None


# `python -m normcli ARGS`, with SIG sent to itself by its last atexit callback: during the
# interpreter's shutdown, after the command's own work and output (torch's finalizers run then).
_SIGNAL_AT_EXIT = """
import atexit, os, runpy, signal, sys, time
atexit.register(lambda: (os.kill(os.getpid(), signal.{sig}), time.sleep(0.5)))
sys.argv = ["normcli", *sys.argv[1:]]
runpy.run_module("normcli", run_name="__main__")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_interpreter_exits_ends_it_without_a_traceback(sig) -> None:
    """The work is done: the signal's default action ends the process, nothing is printed."""
    script = _SIGNAL_AT_EXIT.format(sig=sig.name)
    proc = subprocess.run(
        [sys.executable, "-c", script, "summary", "--model", "mnist_net", "--json"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (-sig, "")
    assert json.loads(proc.stdout)  # the command's output was complete before the signal


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_failed_worker_stopped_by_its_launcher_while_exiting_stays_quiet(sig, tmp_path) -> None:
    """A worker under `normcli train --nproc N` that failed is on its way out when the launcher
    signals every worker to stop (CI caught a traceback from torch's finalizers): it exits with
    its own code, having printed nothing (the launcher reports one line for all)."""
    script = _SIGNAL_AT_EXIT.format(sig=sig.name)
    errors = tmp_path / "error.json"
    env = _env(RANK="0", NORMCLI_LAUNCHER="1", TORCHELASTIC_ERROR_FILE=str(errors))
    proc = subprocess.run(
        [sys.executable, "-c", script, "train", "--nproc", "0"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "")
    record = json.loads(errors.read_text())
    assert record["normcli"] == {"rank": 0, "exit_code": 2, "kind": "user"}
    assert record["message"] == "--nproc must be a positive number of processes, got 0"


def test_both_entry_points_are_the_small_module() -> None:
    """The entry point and the one module it imports first load nothing heavy (torch,
    typer, the CLI) before the signal handlers are in place."""
    root = Path(normcli.__file__).parents[1]
    assert 'normcli = "normcli.entry:run"' in (root / "pyproject.toml").read_text()
    assert "from normcli.entry import run" in (root / "normcli" / "__main__.py").read_text()
    for module in ("entry.py", "runtime.py", "errors.py"):
        text = (root / "normcli" / module).read_text()
        heavy = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        assert not any("torch" in line or "typer" in line or "normcli.cli" in line
                       for line in heavy), module  # fmt: skip
    imported = {line.split()[1] for line in (root / "normcli" / "entry.py").read_text().splitlines()
                if line.startswith(("import ", "from "))}  # fmt: skip
    assert imported <= {"__future__", "sys", "normcli.runtime"}


@pytest.mark.parametrize(
    ("user", "spins"),
    [({}, "1000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "0"), ({"GOMP_SPINCOUNT": "7"}, "7")],
)
def test_openmp_idle_threads_spin_briefly_unless_the_user_chose(user, spins) -> None:
    """What libgomp itself reports (OMP_DISPLAY_ENV) when torch loads under the console
    script's entry point: normcli's policy must be in place before that, or it is ignored."""
    env = {k: v for k, v in _env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", "from normcli.entry import run; run()", "summary", "--help"],
        env={**env, **user, "OMP_DISPLAY_ENV": "VERBOSE"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"GOMP_SPINCOUNT = '{spins}'" in result.stderr


# --- 4. environment ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_a_narrow_locale_does_not_crash_on_non_ascii_text(
    tiny_data, tiny_checkpoints, tmp_path, encoding
):
    names = ["zéro…", "un ±1", *map(str, range(2, 10))]
    ckpt = _variant(tiny_checkpoints["gn"], tmp_path / "café.safetensors", names)
    result = _normcli("eval", ckpt, "--data-dir", tiny_data, env={"PYTHONIOENCODING": encoding})
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode(encoding)
    assert "caf" in text and "Total incorrect predictions" in text
    if encoding == "latin-1":
        assert "zéro?" in text and "un ±1" in text  # what latin-1 has is kept, '…' becomes '?'
    else:
        assert "z?ro?" in text


def test_a_path_that_is_not_utf8_is_printed_byte_for_byte(tiny_checkpoints, tmp_path) -> None:
    out = os.fsencode(tmp_path) + b"/caf\xe9.png"
    result = _normcli(
        "plot", tiny_checkpoints["gn"], "--out", os.fsdecode(out), env={"PYTHONIOENCODING": "utf-8"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == out + b"\n"
    assert Path(os.fsdecode(out)).read_bytes().startswith(PNG)


def test_nonsense_columns_do_not_gut_tables(monkeypatch) -> None:
    from normcli.console import MIN_WIDTH, PIPE_WIDTH, _console

    for columns in ("0", "5", "abc"):
        monkeypatch.setenv("COLUMNS", columns)
        assert _console(file=StringIO()).width == PIPE_WIDTH
        assert _console(file=StringIO(), force_terminal=True).width >= MIN_WIDTH
    monkeypatch.setenv("COLUMNS", "90")
    assert _console(file=StringIO()).width == 90


def test_columns_zero_end_to_end() -> None:
    result = _normcli("summary", "--model", "mnist_net", "--compare", env={"COLUMNS": "0"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "mnist_net: trainable parameters per norm"
    for norm in ("bn", "gn", "ln", "in", "none"):
        assert any(line.split()[1:2] == [norm] for line in lines if len(line.split()) > 2)


def test_a_closed_stdout_is_an_error() -> None:
    result = subprocess.run(
        ["bash", "-c", 'exec "$0" -m normcli --version >&-', sys.executable],
        env=_env(), stderr=subprocess.PIPE, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr == b"normcli: error: cannot write to standard output (Bad file descriptor)\n"
    )


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full")
def test_a_full_stdout_is_an_error(tiny_data, tiny_checkpoints) -> None:
    with open("/dev/full", "wb") as full:  # written to, never replaced
        result = _normcli("eval", tiny_checkpoints["gn"], "--data-dir", tiny_data, stdout=full)
    assert result.returncode == 1
    assert result.stderr == b"normcli: error: cannot write to standard output " \
        b"(No space left on device)\n"  # fmt: skip


def test_a_reader_that_goes_away_ends_the_run_quietly_with_141() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "normcli", "summary", "--model", "mnist_net"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # like `| head -0`: nobody reads
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == b""


# --- 5. text from files and arguments is data --------------------------------------------------


@pytest.fixture
def bracketed(tiny_checkpoints, tmp_path) -> list[Path]:
    """Checkpoints whose paths and class names look like rich markup (and mathtext)."""
    names = ["[/]", "[bold]one", "$x^$", *map(str, range(3, 10))]
    return [  # a file name cannot hold '/', so '[/]' spans a folder and a file
        _variant(tiny_checkpoints["gn"], tmp_path / "run[lr=0.1][/].safetensors", names),
        _variant(tiny_checkpoints["bn_l1"], tmp_path / "[red]b[bold].safetensors", names),
    ]


def test_eval_prints_markup_like_names_as_they_are(cli, tiny_data, bracketed, tmp_path):
    for ckpt in bracketed:
        one = cli("eval", ckpt, "--data-dir", tiny_data, "--confusion", tmp_path / "c.png",
                  "--overwrite")  # fmt: skip
        assert one.exit_code == 0, one.stderr
        assert one.stdout.splitlines()[1].startswith(f"{ckpt.stem}  mnist_net")
        assert "[/]" in one.stdout and "[bold]one" in one.stdout and "$x^$" in one.stdout
    both = cli("eval", *bracketed, "--data-dir", tiny_data)
    assert both.exit_code == 0, both.stderr
    assert "[red]b[bold]" in both.stdout


def test_misclassified_with_markup_and_dollars_in_names(cli, tiny_data, bracketed, tmp_path):
    result = cli("misclassified", bracketed[0], "--n", "1000", "--data-dir", tiny_data)
    assert result.exit_code == 0, result.stderr
    assert f"{bracketed[0]}: only" in result.stderr  # the message names the file as it is


def test_print_table_and_progress_take_text_literally() -> None:
    from normcli.console import print_table, step_progress

    out = StringIO()
    console = Console(file=out, width=100)
    print_table("[bold]t[/]", ["[/]", "n"], [("[red]x", 1)], console=console)
    assert "[bold]t[/]" in out.getvalue() and "[/]" in out.getvalue()
    assert "[red]x" in out.getvalue()
    term = StringIO()
    with step_progress("evaluating", 2, Console(file=term, force_terminal=True)) as advance:
        advance("a[/]b")
        advance("c")
    assert "a[/]b" in term.getvalue()


def test_plot_titles_and_labels_with_dollars(cli, bracketed, tmp_path, captured_figures):
    figures = captured_figures
    dollar = _variant(bracketed[0], tmp_path / "cost $x^$.safetensors")
    for title in ("cost $5", "a $x^$", "$$"):
        result = cli("plot", dollar, bracketed[0], "--title", title, "--out", tmp_path / "c.png",
                     "--overwrite")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert figures[-1]._suptitle.get_text() == title
    legend = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert any("$x^$" in label for label in legend)


def test_grid_and_confusion_figures_render_dollar_class_names(tiny_data, bracketed, tmp_path):
    from normcli.checkpoint import load_checkpoint
    from normcli.evaluate import test_splits

    ckpt = load_checkpoint(bracketed[0])
    split = test_splits([ckpt], tiny_data)[ckpt.meta.dataset]
    plots.write_misclassified_grid(ckpt, split, tmp_path / "g.png", n=100)
    confusion = [[int(i == j) for j in range(10)] for i in range(10)]
    fig = plots.confusion_figure(confusion, ckpt.meta.class_names, "$x^$ title")
    plots.save_figure(fig, tmp_path / "c.png")
    assert (tmp_path / "g.png").read_bytes().startswith(PNG)
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)


# --- 6. first-minute things --------------------------------------------------------------------


def test_version_alone(cli) -> None:
    result = cli("--version")
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"{normcli.__version__}\n", "")


def test_shell_completion_is_there_and_leaves_arguments_alone(cli) -> None:
    assert "--install-completion" in cli("--help").stdout
    shown = cli("--show-completion", "bash")
    assert shown.exit_code == 0 and "_NORMCLI_COMPLETE" in shown.stdout
    assert cli("--debug", "summary", "--model", "mnist_net", "--json").exit_code == 0


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["eval", "--bogus"], "No such option: --bogus"),
        (["eval", "x.safetensors", "--limit", "ten"], "Invalid value for '--limit'"),
        (["plot", "x.safetensors", "--format", "gif"], "Invalid value for '--format'"),
    ],
)
def test_usage_errors_are_exactly_one_line(cli, args, line) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"normcli: error: {line}")
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")


def test_an_error_after_the_progress_display_started_is_still_one_line(cli, tiny_data, tmp_path):
    result = cli(
        "train", "--data-dir", tmp_path, "--epochs", "1", "--out", tmp_path / "x.safetensors"
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("normcli: error: ") and result.stderr.count("\n") == 1


def test_summary_compare_title_is_one_line_in_80_columns(monkeypatch) -> None:
    from normcli.console import print_table

    out = StringIO()
    print_table("mnist_net: trainable parameters per norm", ["norm", "params"], [("bn", 8906)],
                console=Console(file=out, width=80))  # fmt: skip
    assert out.getvalue().splitlines()[0] == "mnist_net: trainable parameters per norm"


def test_summary_table_shows_exact_mult_adds(cli) -> None:
    from normcli.models import build_model
    from normcli.summary import layer_summary

    table = cli("summary", "--model", "mnist_net").stdout
    assert "Units." not in table
    stats = layer_summary(build_model("mnist_net", norm="bn"), "mnist_net", "bn", None).stats
    assert f"Total mult-adds: {stats.total_mult_adds:,}" in table


def test_summary_list_json_has_whole_descriptions(cli) -> None:
    rows = {r["name"]: r for r in json.loads(cli("summary", "--list", "--json").stdout)}
    assert rows["cifar_net"]["description"].endswith("global average pooling over the 8x8 map.")
    assert all(r["description"].endswith((".", ")")) for r in rows.values())
    assert all("\n" not in r["description"] for r in rows.values())


def test_the_comparison_table_uses_the_markdown_labels(cli, tiny_data, tiny_checkpoints) -> None:
    paths = [tiny_checkpoints[k] for k in ("bn_l1", "gn", "ln")]
    result = cli("eval", *paths, "--data-dir", tiny_data)
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "mnist" not in line]
    for name, label in (("bn_l1", "BN + L1 (1e-4)"), ("gn", "GN (G=2) + WS"), ("ln", "LN + WS")):
        assert any(name in row and label in row for row in rows), result.stdout
    assert result.stderr == ""  # no progress residue in a log


# --- 7. plots -----------------------------------------------------------------------------------


def _history(final: float, epochs: int = 12) -> list[dict[str, float]]:
    rows = []
    for e in range(1, epochs + 1):
        acc = final - 8.0 / e**2  # 91.5 after one epoch, the plateau in the last half
        rows.append({"epoch": e, "test_accuracy": acc, "train_accuracy": acc - 0.1,
                     "test_loss": 1.0 / e, "train_loss": 1.2 / e, "lr": 0.05})  # fmt: skip
    return rows


def test_accuracy_axes_make_the_plateau_readable() -> None:
    runs = [("BN", _history(99.45)), ("GN", _history(99.6)), ("LN", _history(99.5))]
    fig = plots.curves_figure(runs)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    for title in ("Test accuracy", "Train accuracy"):
        low, high = by_title[title].get_ylim()
        metric = "test_accuracy" if title.startswith("Test") else "train_accuracy"
        finals = [h[-1][metric] for _, h in runs]
        assert low < min(finals) and max(finals) < high
        assert high - low < 1.0  # 99.45 and 99.6 are far apart on this axis
    low, high = by_title["Test loss"].get_ylim()
    assert low <= 1.0 / 12 and high >= 1.0  # losses keep every epoch in view


def test_coinciding_curves_stay_distinguishable() -> None:
    same = _history(99.5)
    fig = plots.curves_figure([(f"run {i}", same) for i in range(6)], ["test_accuracy"])
    styles = [(line.get_marker(), line.get_linestyle()) for line in fig.axes[0].get_lines()]
    assert len(set(styles)) == 6
    assert len({plots.run_style(i) for i in range(32)}) == 32


def test_runs_of_different_datasets_give_a_warning(cli, tiny_checkpoints, tmp_path, capsys):
    from normcli.checkpoint import read_metadata

    metas = [read_metadata(tiny_checkpoints[k]) for k in ("gn", "cifar")]
    assert plots.mixed_datasets_warning(metas[:1]) is None
    plots.curves_figure([("a", metas[0].history), ("b", metas[1].history)])
    assert capsys.readouterr() == ("", "")  # the library does not print
    result = cli(
        "plot", tiny_checkpoints["gn"], tiny_checkpoints["cifar"], "--out", tmp_path / "c.png"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        "normcli: warning: plotting runs of different datasets together (cifar10, mnist): "
        "their losses and accuracies are not comparable\n"
    )


# --- 8. odd files -------------------------------------------------------------------------------


def test_hidden_files_in_a_folder_are_skipped_as_ls_does(cli, tiny_checkpoints, tmp_path):
    folder = tmp_path / "copied from a mac"
    good = _variant(tiny_checkpoints["gn"], folder / "gn.safetensors")
    (folder / "._gn.safetensors").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))  # AppleDouble
    (folder / ".gn.safetensors").write_bytes(b"")
    assert checkpoint.find_checkpoints([folder]) == [good]
    result = cli("eval", folder, "--group-by", "norm", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["test_accuracy"]["n"] == 1
    assert checkpoint.find_checkpoints([folder / "._gn.safetensors"]) == [
        folder / "._gn.safetensors"
    ]  # a file named on purpose is still read (and refused if it is not a checkpoint)


def test_a_checkpoint_whose_name_is_not_utf8(
    cli, tiny_data, tiny_checkpoints, tmp_path, captured_figures
):
    folder = tmp_path / "bytes"
    name = os.fsdecode(b"r\xff.safetensors")
    odd = _variant(tiny_checkpoints["gn"], folder / name)
    _variant(tiny_checkpoints["gn"], folder / "plain.safetensors")  # same label: stems shown
    result = cli("eval", folder, "--group-by", "norm", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["test_accuracy"]["n"] == 2
    result = cli("eval", odd, "--data-dir", tiny_data, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["name"] == os.fsdecode(b"r\xff")
    result = cli("plot", folder, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.stderr
    legend = captured_figures[-1].axes[0].get_legend().get_texts()
    labels = sorted(t.get_text() for t in legend)  # one label each: the stems are shown
    assert labels == ["GN (G=2) + WS [plain]", "GN (G=2) + WS [r\ufffd]"]  # not refused
    heatmap = plots.confusion_figure([[1, 0], [0, 1]], ["a", "b"], os.fsdecode(b"r\xff: 100%"))
    heatmap.savefig(tmp_path / "h.png")


def test_history_of_a_run_without_epochs_is_the_header(cli, tiny_checkpoints, tmp_path):
    raw, tensors = read_file(tiny_checkpoints["gn"])
    empty = tmp_path / "empty.safetensors"
    save_file(tensors, str(empty), metadata={**raw, "history": "[]", "resume": "null"})
    result = cli("history", empty)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [",".join(history_columns())]
    full = cli("history", tiny_checkpoints["gn"])
    assert full.stdout.splitlines()[0] == result.stdout.strip()  # the same header with rows
    assert result.stderr == f"normcli: warning: {empty}: no epochs recorded\n"
    assert json.loads(cli("history", empty, "--json").stdout) == []


def test_plot_of_a_history_with_a_huge_finite_loss(cli, tiny_checkpoints, tmp_path):
    raw, tensors = read_file(tiny_checkpoints["gn"])
    rows = json.loads(raw["history"])
    rows[0]["train_loss"] = 1e308
    rows[-1]["test_loss"] = 1.7e308
    big = tmp_path / "diverged.safetensors"
    save_file(tensors, str(big), metadata={**raw, "history": json.dumps(rows)})
    result = cli("plot", big)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
    result = cli("plot", big, tiny_checkpoints["gn"], "--x", "norm", "--y", "test_loss",
                 "--out", tmp_path / "study.png")  # fmt: skip
    assert result.exit_code == 0, result.stderr
