"""The reaper of a sweep's private Ray: a tiny process that outlives its driver and, once the
driver is gone however it ended (SIGKILL included), kills what is left of that Ray and removes
its folder.

Ray already ties its GCS server and raylet to the driver (the kernel kills them when the driver
dies), but not the agents the raylet starts: those wait for a GCS that is gone for a minute or
more. Every process of the private Ray is started with MARKER=<its folder> in its environment;
the reaper finds them by that line in /proc/PID/environ (Linux only) and kills them.

Run as a script with only the standard library (`python -I -S reaper.py FOLDER`), started in its
own session (so a Ctrl-C meant for the driver does not reach it), with a pipe from the driver as
standard input: end of file on it means the driver has finished or died.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time

MARKER = "NORMCLI_RAY_DIR"


def marked(folder: str) -> list[int]:
    """This user's processes started with MARKER=`folder` in their environment, but this one."""
    needle = f"{MARKER}={folder}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        # Suppressed: a process that is gone meanwhile, or not ours to read.
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as environ:
            if needle in environ.read().split(b"\0"):
                found.append(int(entry))
    return found


def reap(folder: str, rounds: int = 3) -> None:
    """Kill the processes marked with `folder`, then remove it; a few rounds, as a process
    that is starting may start another meanwhile."""
    for _ in range(rounds):
        pids = marked(folder)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> None:
    """Wait for end of file on standard input, then reap argv[1]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.read(0, 4096):
        pass
    reap(argv[1])


if __name__ == "__main__":
    main(sys.argv)
