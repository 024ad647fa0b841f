"""Human output: rich progress bar and tables on stderr; stdout stays for data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

stderr = Console(stderr=True)
stdout = Console()


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
    """A rich table (on stdout: it is the command's result); numbers right-aligned."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        numeric = bool(rows) and isinstance(rows[0][i], (int, float))
        table.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    console.print(table, width=max(console.width, 120))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)
