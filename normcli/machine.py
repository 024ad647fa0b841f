"""The machine a run trained on, as its checkpoint records it: CPU model, cores, device."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import TypedDict

import torch


class MachineRecord(TypedDict):
    """Where the run's last epoch trained (a resumed run may have moved)."""

    cpu: str  # the CPU's model name, e.g. 'AMD EPYC 7B13'
    cores: int  # CPU cores this process could use
    device: str  # 'cpu', or the GPU's name, e.g. 'cuda: NVIDIA H100 80GB HBM3'


@functools.cache  # read once: the record is rewritten after every epoch
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine(device: torch.device) -> MachineRecord:
    """This machine, training on `device`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = "cpu"
    if device.type == "cuda":
        name = f"cuda: {torch.cuda.get_device_name(device)}"
    elif device.type != "cpu":
        name = device.type
    return MachineRecord(cpu=cpu_model(), cores=cores or 1, device=name)
