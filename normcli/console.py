"""Human output: rich progress bar and tables on stderr; stdout stays for data.

Text from files and arguments (checkpoint names, class names, paths) reaches rich as
`Text` objects or with markup=False: a '[/]' in a file name is printed, never parsed.
Progress bars are drawn on a terminal only; logs get the per-epoch lines, no bar residue.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from normcli.evaluate import CheckpointReport

# Piped or captured output has no terminal width to fit; rich would assume 80 columns and
# squeeze wide tables into truncated cells. Give it room unless COLUMNS says otherwise.
PIPE_WIDTH = 160
# Narrower than this, tables lose their columns (COLUMNS=0 drops them altogether): a COLUMNS
# below it is ignored, as is a terminal that reports less.
MIN_WIDTH = 40


def _console(**kwargs: Any) -> Console:
    console = Console(**kwargs)
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) >= MIN_WIDTH:
        return console
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    elif console.width < MIN_WIDTH:
        console.width = MIN_WIDTH
    return console


LOG_SECONDS = 30.0  # progress lines in a log: one per this many seconds within an epoch

stderr = _console(stderr=True)
stdout = _console()


class ProgressReporter:
    """Training progress: one bar per epoch (running loss/accuracy, img/s), a line per epoch.

    `name` (the run's, e.g. its checkpoint's stem) opens the bar and every line, so runs
    trained side by side on one terminal or into one log can be told apart."""

    def __init__(self, console: Console = stderr, name: str | None = None) -> None:
        self.console = console
        self.prefix = f"{name}  " if name else ""
        self.progress = Progress(
            TextColumn(self.prefix, markup=False, style="bold"),  # a file name: plain text
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%"),
            TextColumn("{task.fields[speed]:.0f} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,  # a bar in a log is noise (and a stray blank line)
        )
        self.task: Any = None
        self.epoch = ""
        self.total = 0
        self.last_line = time.monotonic()

    def __enter__(self) -> ProgressReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start_epoch(self, epoch: int, epochs: int, num_batches: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.epoch, self.total = f"{epoch}/{epochs}", num_batches
        self.task = self.progress.add_task(
            "train", total=num_batches, epoch=self.epoch, loss=0.0, acc=0.0, speed=0.0
        )

    def batch(self, done: int, loss: float, accuracy: float, images_per_s: float) -> None:
        self.progress.update(self.task, completed=done, loss=loss, acc=accuracy, speed=images_per_s)
        # In a log (no bar), a line every LOG_SECONDS says the run is alive and how fast.
        now = time.monotonic()
        if not self.console.is_terminal and now - self.last_line >= LOG_SECONDS:
            self.last_line = now
            self.console.print(
                f"{self.prefix}epoch {self.epoch}  batch {done}/{self.total}  loss {loss:.4f} "
                f"acc {accuracy:.2f}%  {images_per_s:.0f} img/s",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

    def end_epoch(self, row: dict[str, float]) -> None:
        self.last_line = time.monotonic()
        self.console.print(
            f"{self.prefix}epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:6.2f}%  test loss {row['test_loss']:.4f} "
            f"acc {row['test_accuracy']:6.2f}%  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s ({row['images_per_second']:.0f} img/s)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], console: Console = stdout
) -> None:
    """A rich table (on stdout: it is the command's result); numbers right-aligned.

    The title is its own line, so a narrow table does not wrap it; every title, header and
    cell is plain text.
    """
    table = Table()
    for i, name in enumerate(columns):
        numeric = bool(rows) and isinstance(rows[0][i], (int, float))
        # Long run names fold onto a second line instead of all ending in the same "…".
        table.add_column(
            Text(str(name)), justify="right" if numeric else "left", overflow="fold"
        )
    for row in rows:
        table.add_row(*(Text(_fmt(v)) for v in row))
    console.print(Text(title, style="italic"), soft_wrap=True)
    console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def markdown_table(reports: Sequence[CheckpointReport]) -> str:
    """The comparison table in Markdown (for READMEs and bench/results)."""
    columns = ["run", "norm", "params", "epochs", "best test acc (%)", "final test acc (%)",
               "eval acc (%)", "wrong", "test loss", "s/epoch"]  # fmt: skip
    cells = [
        (r.name, r.label, f"{r.params:,}", r.epochs, _fixed(r.best_accuracy),
         _fixed(r.final_accuracy), f"{r.metrics.accuracy:.2f}", r.metrics.wrong,
         f"{r.metrics.loss:.4f}", _fixed(r.seconds_per_epoch, 1))
        for r in reports
    ]  # fmt: skip
    if any(r.tta is not None for r in reports):  # eval --tta: its own column
        columns.append("TTA acc (%)")
        cells = [(*row, _fixed(r.tta.accuracy if r.tta else None))
                 for row, r in zip(cells, reports, strict=True)]  # fmt: skip
    return to_markdown(columns, cells, right=columns[2:])


def comparison_rows(reports: Sequence[CheckpointReport]) -> tuple[list[str], list[list[Any]]]:
    """The comparison for spreadsheets (eval --csv): one row per checkpoint, plain numbers."""
    columns = ["run", "path", "label", "params", "epochs", "best_accuracy", "final_accuracy",
               "eval_accuracy", "wrong", "eval_loss", "seconds_per_epoch"]  # fmt: skip
    cells = [
        [r.name, r.path, r.label, r.params, r.epochs,
         *("" if v is None else v for v in (r.best_accuracy, r.final_accuracy)),
         r.metrics.accuracy, r.metrics.wrong, r.metrics.loss,
         "" if r.seconds_per_epoch is None else r.seconds_per_epoch]
        for r in reports
    ]  # fmt: skip
    return columns, cells


def _fixed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def show_report(rep: CheckpointReport, class_names: Sequence[str]) -> None:
    """One checkpoint: headline numbers, per-class accuracy, confusion matrix."""
    m = rep.metrics
    stdout.print(
        Text.assemble(
            (rep.name, "bold"),
            f"  {rep.model}, {rep.label}, {rep.params:,} params, {rep.dataset}\n"
            f"test loss {m.loss:.4f}  test accuracy {m.accuracy:.2f}%  "
            f"({m.correct}/{m.total})  Total incorrect predictions: {m.wrong}",
        ),
        soft_wrap=True,
        highlight=False,
    )
    if rep.tta is not None:  # its own protocol, on its own line
        stdout.print(
            f"TTA ({', '.join(rep.tta_views or [])}): test loss {rep.tta.loss:.4f}  "
            f"TTA accuracy {rep.tta.accuracy:.2f}%  ({rep.tta.correct}/{rep.tta.total})",
            soft_wrap=True,
            highlight=False,
        )
    print_table(
        "Per-class accuracy",
        ["class", "images", "accuracy (%)"],
        [
            (c, sum(row), acc)
            for c, row, acc in zip(class_names, m.confusion, m.per_class_accuracy, strict=True)
        ],
    )
    print_table(
        "Confusion matrix (rows: true, columns: predicted)",
        ["true \\ pred", *class_names],
        [(c, *row) for c, row in zip(class_names, m.confusion, strict=True)],
    )


def show_comparison(reports: Sequence[CheckpointReport]) -> None:
    """Several checkpoints: one row each, labelled as in the Markdown table."""
    columns = ["run", "norm", "params", "best acc (%)", "final acc (%)", "eval acc (%)",
               "wrong"]  # fmt: skip
    rows = [
        (r.name, r.label, r.params, r.best_accuracy, r.final_accuracy, r.metrics.accuracy,
         r.metrics.wrong)
        for r in reports
    ]  # fmt: skip
    if any(r.tta is not None for r in reports):  # eval --tta: its own column
        columns.append("TTA acc (%)")
        tta = [r.tta.accuracy if r.tta else None for r in reports]
        rows = [(*row, acc) for row, acc in zip(rows, tta, strict=True)]
    print_table("Comparison", columns, rows)


def _mean_std(stats: dict | None, digits: int) -> str:
    if not stats or not stats.get("n"):
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def group_rows(rows: Sequence[dict], keys: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Columns and cells of a --group-by table: the keys, n, then per metric mean ± std, min,
    max (accuracies with 2 decimals, losses with 4)."""
    metrics = [k for k in rows[0] if k not in keys] if rows else []
    columns = [*keys, "n"]
    for m in metrics:
        columns += [f"{m} (mean ± std)", f"{m} min", f"{m} max"]
    cells = []
    for row in rows:
        n = max((row[m]["n"] for m in metrics if row[m]), default=0)
        line: list[Any] = [*(str(row[k]) for k in keys), n]
        for m in metrics:
            digits = 4 if "loss" in m else 2
            stats = row[m] or {}
            line += [_mean_std(stats, digits),
                     *(f"{stats[x]:.{digits}f}" if stats.get(x) is not None else "-"
                       for x in ("min", "max"))]  # fmt: skip
        cells.append(line)
    return columns, cells


def flat_rows(rows: Sequence[dict], keys: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """A --group-by table for spreadsheets: keys, n, and <metric>_mean/_std/_min/_max numbers."""
    metrics = [k for k in rows[0] if k not in keys] if rows else []
    columns = [*keys, "n", *(f"{m}_{x}" for m in metrics for x in ("mean", "std", "min", "max"))]
    cells = []
    for row in rows:
        n = max((row[m]["n"] for m in metrics if row[m]), default=0)
        stats = [(row[m] or {}).get(x) for m in metrics for x in ("mean", "std", "min", "max")]
        cells.append([*(row[k] for k in keys), n, *("" if v is None else v for v in stats)])
    return columns, cells


def to_markdown(
    columns: Sequence[str], cells: Sequence[Sequence[Any]], right: Collection[str] = ()
) -> str:
    """A Markdown table; the columns named in `right` are right-aligned. A '|' in a cell is
    escaped and a line break becomes a space: a cell never splits its row."""
    rule = "".join(" ---: |" if c in right else " --- |" for c in columns)
    lines = ["| " + " | ".join(map(_cell, columns)) + " |", "|" + rule]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A value as the text of one Markdown table cell."""
    return " ".join(str(value).replace("|", "\\|").splitlines())


def to_csv(columns: Sequence[str], cells: Sequence[Sequence[Any]]) -> str:
    """CSV text (with a header row)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(cells)
    return buffer.getvalue()


class SweepProgress:
    """One bar of a sweep's runs on stderr (done, running, failed, total, ETA) and one line per
    finished run; the workers' own output never reaches the terminal."""

    def __init__(self, manifest: dict, console: Console = stderr) -> None:
        points = manifest["points"]
        self.points = points
        self.console = console
        self.total = len(points)
        self.done = sum(p["status"] == "done" for p in points)
        self.failed = 0
        self.running = 0
        self.progress = Progress(
            TextColumn("[bold]runs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.task: Any = None

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        self.task = self.progress.add_task(
            "sweep", total=self.total, completed=self.done, running=0, failed=0
        )
        if self.done:
            self.console.print(f"{self.done} of {self.total} runs already done", highlight=False)
        for point in self.points:  # a failed point's last error; why a done one runs again
            if point["status"] != "done" and point["error"]:
                line = f"again   {point['name']}: {point['error']}"
                self.console.print(line, highlight=False, markup=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def event(self, kind: str, name: str, info: dict) -> None:
        """An engine event: 'started', 'finished' (with the result) or 'failed' (the error)."""
        if kind == "started":
            self.running += 1
        else:
            self.running -= 1
            if kind == "finished":
                self.done += 1
                result = info.get("result") or {}
                acc = result.get("test_accuracy")
                what = f"test accuracy {acc:.2f}%" if acc is not None else "done"
                self.console.print(f"done    {name}: {what}", highlight=False, markup=False)
            else:
                self.failed += 1
                self.console.print(
                    f"failed  {name}: {info.get('error')}", highlight=False, markup=False
                )
        self.progress.update(
            self.task,
            completed=self.done + self.failed,
            running=self.running,
            failed=self.failed,
        )


@contextlib.contextmanager
def step_progress(what: str, total: int, console: Console = stderr) -> Iterator[Any]:
    """A transient 'what name (i/total)' spinner on a terminal, nothing in a log.

    Yields `advance(name)`, called before each step with the name of what it works on.
    """
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task("", total=total)
    done = -1

    def advance(name: str) -> None:
        nonlocal done
        done += 1
        progress.update(task, completed=done, description=escape(f"{what} {name}"), refresh=True)

    with progress:
        yield advance
