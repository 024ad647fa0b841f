"""Human output: rich progress bar and tables on stderr; stdout stays for data.

Text from files and arguments (checkpoint names, class names, paths) reaches rich as
`Text` objects or with markup=False: a '[/]' in a file name is printed, never parsed.
Progress bars are drawn on a terminal only; logs get the per-epoch lines, no bar residue.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
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


stderr = _console(stderr=True)
stdout = _console()


class ProgressReporter:
    """Training progress: one bar per epoch (running loss/accuracy, img/s), a line per epoch."""

    def __init__(self, console: Console = stderr) -> None:
        self.console = console
        self.progress = Progress(
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

    def __enter__(self) -> ProgressReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start_epoch(self, epoch: int, epochs: int, num_batches: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(
            "train", total=num_batches, epoch=f"{epoch}/{epochs}", loss=0.0, acc=0.0, speed=0.0
        )

    def batch(self, done: int, loss: float, accuracy: float, images_per_s: float) -> None:
        self.progress.update(self.task, completed=done, loss=loss, acc=accuracy, speed=images_per_s)

    def end_epoch(self, row: dict[str, float]) -> None:
        self.console.print(
            f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:6.2f}%  test loss {row['test_loss']:.4f} "
            f"acc {row['test_accuracy']:6.2f}%  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s ({row['images_per_second']:.0f} img/s)",
            highlight=False,
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
        table.add_column(Text(str(name)), justify="right" if numeric else "left")
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
    lines = [
        "| run | norm | params | epochs | best test acc (%) | final test acc (%) "
        "| eval acc (%) | wrong | test loss | s/epoch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in reports:
        spe = f"{r.seconds_per_epoch:.1f}" if r.seconds_per_epoch is not None else "-"
        lines.append(
            f"| {r.name} | {r.label} | {r.params:,} | {r.epochs} | {_pct(r.best_accuracy)} "
            f"| {_pct(r.final_accuracy)} | {r.metrics.accuracy:.2f} | {r.metrics.wrong} "
            f"| {r.metrics.loss:.4f} | {spe} |"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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
    print_table("Comparison", columns, rows)


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
