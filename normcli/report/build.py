"""Gather a study into a `Report`: groups, tables, sentences and figures, from the checkpoints'
metadata (the histories) and, unless told not to, one evaluation of each run on its test set
(confusion matrices and misclassified images need the predictions)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normcli import __version__
from normcli.report import groups as grouping
from normcli.report import provenance
from normcli.report.figures import ReportFigure, curve_figures, evaluated_figures, study_plot
from normcli.report.tables import (
    Table,
    cell,
    comparison_table,
    differences_table,
    gap_table,
    number,
    simple_table,
)

Progress = Callable[[str], None]


@dataclass
class Report:
    """Everything a report page shows, ready for a template."""

    title: str
    inputs: list[str]
    keys: list[str]
    notes: list[str]  # warnings a reader must not miss (pooled settings, mixed datasets)
    commands: list[str]
    environment: list[tuple[str, str]]
    setup: Table  # per group: the options that differ between runs, and the seeds
    runs: Table
    comparison: Table
    differences: Table
    gap: Table
    params: Table
    evaluation: str  # what the confusion matrices and grids were computed on
    figures: dict[str, list[ReportFigure]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # the aggregate rows behind the tables
    generator: str = f"normcli {__version__}"

    def all_figures(self) -> list[ReportFigure]:
        return [f for section in self.figures.values() for f in section]


def _records(paths: Sequence[Path], metas: Sequence[Any]) -> list[dict]:
    """`checkpoint_records`, plus the train–test gaps of each run's last epoch."""
    from normcli.study import checkpoint_records

    records = checkpoint_records(paths)
    for record in records:
        record["train_test_gap"] = record["train_accuracy"] - record["test_accuracy"]
        record["loss_gap"] = record["test_loss"] - record["train_loss"]
    return records


def _keys_and_notes(records: list[dict], group_by: Sequence[str] | None) -> tuple[list, list]:
    """The group keys (given, or the fewest that separate the settings) and the notes."""
    notes = []
    if group_by is None:
        keys = grouping.grouping_keys(records)
    else:
        keys = list(group_by)
        grouping.check_keys(records, keys)
    pooled = grouping.pooled_settings(records, keys)
    if pooled:
        what = "; ".join(f"{k} ({', '.join(v)})" for k, v in pooled.items())
        notes.append(
            f"Runs with different settings are pooled in one group: they differ in {what}, "
            f"not only in their seed. Their means and intervals mix those settings; group by "
            f"{', '.join([*keys, *pooled])} to keep them apart."
        )
    datasets = sorted({r["dataset"] for r in records})
    if len(datasets) > 1:
        notes.append(f"These runs are of different datasets ({', '.join(datasets)}): their "
                     "accuracies and losses are not comparable.")  # fmt: skip
    return keys, notes


def _setup_table(rows: list, records: list, names: list, keys: list) -> Table:
    """Per group: the options that differ between runs (besides the seed), and the seeds."""
    shown = [k for k in grouping.varying_options(records) if k != grouping.REPLICATE]
    cells = []
    for row, name in zip(rows, names, strict=True):
        runs = grouping.members(row, records, keys)
        values = [", ".join(dict.fromkeys(cell(r[k]).text for r in runs)) for k in shown]
        seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in runs}))
        cells.append([name, *values, seeds])
    return simple_table(["group", *shown, "seeds"], cells)


def _runs_table(records: list, names: list, rows: list, keys: list) -> Table:
    """One line per run: its file, group, seed, epochs, training time and final accuracy."""
    group_of = {}  # path -> (the group's place in the comparison table, its name)
    for place, (row, name) in enumerate(zip(rows, names, strict=True)):
        for record in grouping.members(row, records, keys):
            group_of[record["path"]] = (place, name)
    ordered = sorted(records, key=lambda r: (group_of[r["path"]][0], r["seed"], r["path"]))
    cells = [
        [Path(r["path"]).stem, group_of[r["path"]][1], r["seed"], r["epochs"],
         round(r["seconds"]), number(r["test_accuracy"], 2)]
        for r in ordered
    ]  # fmt: skip
    columns = ["run", "group", "seed", "epochs", "training (s)", "final test accuracy (%)"]
    return simple_table(columns, cells)


def _params_table(rows: list, records: list, names: list, keys: list, metas: dict) -> Table:
    """Per group: the model and its trainable parameters (built from the first run's args)."""
    from normcli.models import count_params

    cells = []
    for row, name in zip(rows, names, strict=True):
        meta = metas[grouping.members(row, records, keys)[0]["path"]]
        cells.append([name, meta.model_args.model, count_params(meta.model_args.build())])
    return simple_table(["group", "model", "trainable parameters"], cells)


def build_report(
    paths: Sequence[str | os.PathLike[str]],
    *,
    group_by: Sequence[str] | None = None,
    evaluate: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Report:
    """The report of the checkpoints in `paths` (files, or folders of them), grouped by
    `group_by` (default: the options that tell the settings apart); with `evaluate`, each
    run is also evaluated on its test set for the confusion matrices and misclassified grids."""
    from normcli.checkpoint import find_checkpoints, read_metadata
    from normcli.plots import default_title
    from normcli.study import aggregate

    checkpoints = find_checkpoints(paths)
    metas = [read_metadata(p) for p in checkpoints]
    records = _records(checkpoints, metas)
    keys, notes = _keys_and_notes(records, group_by)
    metrics = ["test_accuracy", "test_loss"]
    metrics += ["val_accuracy"] if any("val_accuracy" in r for r in records) else []
    rows = aggregate(records, keys, [*metrics, "train_accuracy", "train_test_gap", "loss_gap"])
    names = grouping.group_names(rows, records, keys)
    title = default_title(metas)
    by_path = {str(p): m for p, m in zip(checkpoints, metas, strict=True)}
    report = Report(
        title=title, inputs=[str(p) for p in paths], keys=keys, notes=notes,
        commands=provenance.commands(checkpoints, metas),
        environment=provenance.environment(metas),
        setup=_setup_table(rows, records, names, keys),
        runs=_runs_table(records, names, rows, keys),
        comparison=comparison_table(rows, names, keys, metrics),
        differences=differences_table(rows, names, keys),
        gap=gap_table(rows, names), params=_params_table(rows, records, names, keys, by_path),
        evaluation="not evaluated (--no-eval)", rows=rows,
    )  # fmt: skip
    report.figures["curves"] = curve_figures(checkpoints, rows, names, keys, title)
    study = study_plot(rows, records, keys, title)
    report.figures["study"] = [study] if study else []
    if evaluate:
        evaluation = _Evaluation(data_dir, limit, device, progress)
        confusion, grids = evaluated_figures(rows, records, names, keys, evaluation)
        report.figures |= {"confusion": confusion, "misclassified": grids}
        report.evaluation = evaluation.describe()
    return report


class _Evaluation:
    """Evaluates groups of checkpoints on their test sets, each set read once."""

    def __init__(self, data_dir: Any, limit: int | None, device: str, progress: Progress | None):
        from normcli.runtime import resolve_device

        self.data_dir, self.limit = data_dir, limit
        self.device = resolve_device(device)
        self.progress = progress or (lambda name: None)
        self.splits: dict[str, Any] = {}

    def __call__(self, paths: list[str]) -> tuple[list[list[int]], list[str], Any]:
        """(confusion summed over the runs, class names, misclassified grid of the first)."""
        from normcli.checkpoint import load_checkpoint
        from normcli.evaluate import report, test_splits
        from normcli.plots import misclassified_grid

        confusion: list[list[int]] = []
        grid = None
        for path in paths:
            self.progress(Path(path).name)
            ckpt = load_checkpoint(path)
            if ckpt.meta.dataset not in self.splits:
                self.splits |= test_splits([ckpt], self.data_dir, self.limit, self.device)
            split = self.splits[ckpt.meta.dataset]
            matrix = report(ckpt, split).metrics.confusion
            if confusion:
                matrix = [[a + b for a, b in zip(x, y, strict=True)]
                          for x, y in zip(confusion, matrix, strict=True)]  # fmt: skip
            confusion = matrix
            if grid is None:
                grid, _ = misclassified_grid(ckpt, split, n=10, sort="confidence", cols=5)
        return confusion, ckpt.meta.class_names, grid

    def describe(self) -> str:
        sizes = ", ".join(f"{name}: {len(s):,} images" for name, s in self.splits.items())
        return f"each run evaluated once on its test set ({sizes})"
