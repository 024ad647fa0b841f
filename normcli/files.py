"""Writing files safely: checks before any work, atomic replacement, and a claim on a path
against other normcli processes. Every file normcli writes goes through here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError


def check_writable(path: Path) -> None:
    """Fail early, before any work, if `path` cannot be written or is not a regular file."""
    check_replaceable(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise NormcliError(f"{path}: folder {parent} does not exist")
    check_folder_writable(parent, path)


def check_replaceable(path: Path) -> None:
    """Refuse an existing `path` (or a symlink's target) that is not a regular file.

    A rename over a device, a FIFO or a socket would replace it (as root, /dev/null itself),
    whatever --overwrite says: normcli writes regular files only.
    """
    try:
        mode = path.stat().st_mode  # follows symlinks: a link is judged by what it points to
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a dangling symlink,
        return  # which the rename replaces); a missing folder is reported by the caller
    except OSError as e:  # a name the OS refuses, a loop of symlinks, no permission
        raise NormcliError(f"{path}: cannot check ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise NormcliError(f"{path}: is a directory, expected a file path")
    if not stat.S_ISREG(mode):
        link = "a symbolic link to " if path.is_symlink() else ""
        raise NormcliError(
            f"{path}: is {link}{_KINDS.get(stat.S_IFMT(mode), 'a special file')}, "
            "not a regular file; normcli writes regular files only"
        )


_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def check_folder_writable(folder: Path, path: Path) -> None:
    """Refuse, naming `path`, an existing `folder` that this process cannot create files in."""
    if not os.access(folder, os.W_OK):
        raise NormcliError(f"{path}: folder {folder} is not writable")
    try:  # os.access says yes to root even on read-only file systems: ask the folder itself
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise NormcliError(f"{path}: folder {folder} is not writable ({e.strerror or e})") from None


def folders_to_make(folder: Path) -> list[Path]:
    """The folders missing on the way to `folder`, outermost first, after checking that it is
    a writable folder or can be made: its nearest existing ancestor is a writable folder."""
    missing = []
    current = folder
    while not current.exists() and not current.is_symlink():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    if not current.is_dir():
        where = "" if current == folder else f" cannot be made: {current}"
        raise NormcliError(f"{folder}{where} is not a folder")
    check_folder_writable(current, folder)
    return missing[::-1]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(path: Path, e: OSError) -> NormcliError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NormcliError(f"no space left on {path} ({e.strerror or e}); nothing was written")
    return NormcliError(f"{path}: cannot write ({e.strerror or e})")


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename over `path`: readers never see a partial file.

    The temporary file sits beside `path` and is removed whatever stops the write (an
    error, a full disk, Ctrl-C, SIGTERM); an existing `path` stays as it was until the rename.
    """
    check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        check_replaceable(path)  # something may have appeared there while we wrote
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, read-only file system, ...
            raise _write_error(path, e) from None
        raise


@contextlib.contextmanager
def exclusive_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Claim `path` for this process while the block runs; yields it as a Path.

    A second normcli process claiming the same path meanwhile fails at once with a
    NormcliError naming the holder's pid, instead of both writing and one silently losing.
    The claim is an flock on `.<name>.lock` beside `path` (released by the kernel if the
    holder dies); the lock file is removed when the block ends.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise NormcliError(
                f"{path}: cannot create lock file {lock} ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise NormcliError(
                    f"{path} is being written by another normcli process (pid {holder})"
                ) from None
            raise NormcliError(f"{path}: cannot lock {lock} ({e.strerror or e})") from None
        # The previous holder removes the file when it is done; if it did so between our open
        # and our flock, we hold a lock on a file no one else can see: open it again.
        try:
            ours, current = os.fstat(fd), os.stat(lock)
            if (ours.st_dev, ours.st_ino) == (current.st_dev, current.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        lock.unlink(missing_ok=True)  # still locked: a waiting process re-opens, see above
        os.close(fd)


def release_stale_claim(path: str | os.PathLike[str]) -> None:
    """Remove what a process killed while holding `path` left beside it (its claim's lock file,
    the temporary files of its unfinished writes), unless a live process holds the claim."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # no claim left there (the usual case)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)  # still locked: a waiting claimant re-opens, see above
    except OSError:  # held by a live process, or gone meanwhile: not ours to touch
        pass
    finally:
        os.close(fd)
