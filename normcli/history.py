"""Runs' histories as one table: a record per run and epoch (`normcli history`), for pandas
or a spreadsheet."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normcli.checkpoint import HISTORY_KEYS, read_metadata
from normcli.config import RunSpec


def history_records(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One record per run and epoch (like timm's summary.csv, for pandas or a spreadsheet):
    the run's name, path and label, every run option, then the epoch's history row. The
    option `lr` (the schedule's peak) is `peak_lr` here: `lr` is the epoch's rate."""
    rows = []
    for path in paths:
        meta = read_metadata(path)
        options = _peak_lr(meta.run.options())
        run = {"run": Path(path).stem, "path": str(path), "label": meta.label, **options}
        rows += [{**run, **{k: row.get(k) for k in HISTORY_KEYS}} for row in meta.history]
    return rows


def history_columns() -> list[str]:
    """The keys of every `history_records` row, in order (the CSV header, rows or none)."""
    return ["run", "path", "label", *_peak_lr(RunSpec().options()), *HISTORY_KEYS]


def _peak_lr(options: dict[str, Any]) -> dict[str, Any]:
    """Run options with `lr` renamed `peak_lr` (moved last): in a history row, lr is the
    epoch's rate."""
    options = dict(options)
    options["peak_lr"] = options.pop("lr")
    return options
