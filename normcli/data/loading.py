"""The data folder: where a dataset's files are looked for, loading a split from them, and
downloading the official archives when they are missing (nothing left behind on failure).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from normcli.data.batching import Split
from normcli.data.records import Dataset, get_dataset
from normcli.errors import NormcliError

DATA_ENV = "NORMCLI_DATA"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: the argument, else $NORMCLI_DATA, else ./data."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path("data")


def download(name: str, root: Path) -> None:
    """Fetch dataset `name`'s official archives (MD5-checked by torchvision).

    A failed download leaves nothing behind: folders and files it created are removed.
    """
    dataset = get_dataset(name)
    before = _existing(root, dataset)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints progress; stdout is data
            root.mkdir(parents=True, exist_ok=True)
            dataset.download(root)
    except BaseException:
        _remove_new(_existing(root, dataset) - before)
        raise


def _existing(root: Path, dataset: Dataset) -> set[Path]:
    """The data folder, its ancestors, and everything under the paths a download writes."""
    found = {p for p in (root, *root.parents) if p.exists()}
    for path in dataset.download_paths(root):
        if path.exists() or path.is_symlink():
            found.add(path)
        if path.is_dir() and not path.is_symlink():
            found.update(path.rglob("*"))
    return found


def _remove_new(paths: set[Path]) -> None:
    """Delete what a failed download created, deepest paths first (files, then folders)."""
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()


def load_split(
    name: str,
    train: bool,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    download_missing: bool = True,
) -> Split:
    """Load a whole split of dataset `name` into memory (CPU), downloading it if missing."""
    dataset = get_dataset(name)
    root = resolve_data_dir(data_dir)
    if limit is not None and limit <= 0:
        raise NormcliError(f"limit must be a positive number of images, got {limit}")
    try:
        split = dataset.read(root, train)
    except FileNotFoundError:
        where = dataset.where(root)
        if not download_missing:
            raise NormcliError(
                f"{name} not found: looked in {where}; put the files there or "
                f"point --data-dir / ${DATA_ENV} at them"
            ) from None
        try:
            download(name, root)
            split = dataset.read(root, train)
        except NormcliError:
            raise
        except Exception as e:  # offline, refused, bad checksum: all end the same way
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(e).__name__
            raise NormcliError(
                f"{name} not found in {where}, and the download failed ({reason}); "
                f"put the official files there or point --data-dir / ${DATA_ENV} at them"
            ) from None
    if tuple(split.images.shape[1:]) != dataset.input_shape:
        raise NormcliError(f"{name}: images of shape {tuple(split.images.shape[1:])}")
    return split.head(limit)


def prepare(name: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """Check that both splits of dataset `name` read (downloading them once if missing);
    returns the image count of each split."""
    return {split: len(load_split(name, split == "train", data_dir)) for split in ("train", "test")}
