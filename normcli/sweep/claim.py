"""One sweep at a time in a sweep folder: the driver holds the folder while it runs.

The claim is normcli.files' exclusive claim on the folder's manifest (an flock the kernel
releases if the driver dies), so a second sweep into the same folder stops at once, naming the
first one's pid, instead of both running its points and one marking the other's finished point
failed. Claims nest within a process: `run_sweep` claims the folder the CLI already holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from normcli.files import exclusive_output, folders_to_make
from normcli.sweep.manifest import MANIFEST_NAME

_held: set[Path] = set()  # folders this process holds


@contextlib.contextmanager
def claim_sweep(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold sweep folder `folder` against other normcli processes while the block runs.

    A missing folder (and its missing parents) is made first, after checking it can be; folders
    made here are removed again if the block fails before writing anything into them.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        yield folder
        return
    made = folders_to_make(folder)
    try:
        for path in made:
            path.mkdir(exist_ok=True)
        with exclusive_output(folder / MANIFEST_NAME):
            _held.add(key)
            try:
                yield folder
            finally:
                _held.discard(key)
    except BaseException:
        for path in reversed(made):  # only empty ones go
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
