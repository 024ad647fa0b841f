"""`normcli data`: get a dataset ready before a long run (checked, downloaded once if missing)."""

from __future__ import annotations

from typing import Annotated

import typer

from normcli.cli.options import DataDirOpt, JsonOpt
from normcli.cli.printing import print_json


def data(
    dataset: Annotated[str, typer.Argument(help="Dataset name (mnist, cifar10, ...).")],
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Check that a dataset's training and test splits read, downloading them once if missing;
    prints the data folder (or, with --json, the folder and each split's image count)."""
    from normcli.data import prepare, resolve_data_dir

    counts = prepare(dataset, data_dir)
    folder = resolve_data_dir(data_dir).resolve()
    if json_:
        print_json({"dataset": dataset, "data_dir": str(folder), **counts})
    else:
        print(folder)
