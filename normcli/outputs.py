"""Where output files go, and the one overwrite rule: refuse an existing file unless --overwrite."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from normcli.checkpoint import check_writable
from normcli.errors import NormcliError


def plan_outputs(out: Path | None, defaults: Sequence[Path], overwrite: bool) -> list[Path]:
    """Output paths: the defaults, or inside `out` when it is a folder, or `out` for one file.

    Checked before any work: an existing file is refused unless `overwrite`, and
    every folder must exist and be writable.
    """
    if out is None:
        paths = list(defaults)
    elif out.is_dir():
        paths = [out / d.name for d in defaults]
    elif len(defaults) > 1:
        raise NormcliError(f"--out {out}: writing {len(defaults)} files needs an existing folder")
    else:
        paths = [out]
    if len(set(paths)) != len(paths):
        raise NormcliError("two outputs would have the same file name; pass --out for each")
    for path in paths:
        if path.exists() and not overwrite:
            raise NormcliError(f"{path} exists; pass --overwrite to replace it")
        check_writable(path)
    return paths
