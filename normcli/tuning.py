"""How a run trains on this machine: its precision (float32, or bfloat16 autocast in the
training step) and memory layout (channels_last or contiguous), decided when it starts, the
way cudnn.benchmark picks convolution kernels.

- Options the user gave are kept (--precision fp32|bf16, --channels-last/--no-channels-last),
  and a resumed run takes both from its checkpoint.
- On a CUDA device: bf16 where the GPU supports it, the norm's layout (Norm.channels_last).
- On the CPU, the precisions it runs natively (bf16 only with amx_bf16 or avx512_bf16 among
  /proc/cpuinfo's flags: elsewhere autocast emulates it, at 0.15x on an AMD EPYC) and both
  layouts are timed for a few SGD steps on synthetic tensors of the run's shape (a second or
  two), and the fastest is kept: which one wins depends on the CPU (GroupNorm trained faster
  contiguous on that EPYC, channels_last on an AMX Xeon: bench/results/precision.md). The
  figures are cached as JSON per (CPU model, flags, torch version, model, norm, batch,
  threads) under $XDG_CACHE_HOME/normcli (default ~/.cache/normcli), so that only a machine's
  first run of a kind measures.
- NORMCLI_TUNE=0 skips the measurement (tests, reproducible timings): the flags alone pick
  the precision, the norm's record the layout.

The other half of the per-CPU choice, OpenMP's spin, is set before torch loads, by the
situation (a lone run or a packed one): normcli.runtime.configure_threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from normcli.config import ModelArgs, RunSpec
from normcli.data import get_dataset
from normcli.norms import get_norm

TUNE_ENV = "NORMCLI_TUNE"  # "0": no measurement
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of native bfloat16 arithmetic
CACHE_VERSION = 1
MEASURE_SECONDS = 1.0  # the timed rounds stop after this (the first MIN_ROUNDS always run)
WARMUP_STEPS = 2  # per option: one-off kernel selection and buffer allocation
MIN_ROUNDS, MAX_ROUNDS = 2, 8

Option = tuple[str, bool]  # (precision, channels_last)


@dataclass(frozen=True)
class CpuFacts:
    """What decides the CPU kernels torch can use: the CPU model, its flags, torch's version."""

    model_name: str
    flags: frozenset[str]
    torch_version: str = torch.__version__

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU computes in bfloat16 natively (AMX or AVX-512 BF16)."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def flags_hash(self) -> str:
        return hashlib.sha256(" ".join(sorted(self.flags)).encode()).hexdigest()[:16]


def cpu_facts(cpuinfo: str | None = None) -> CpuFacts:
    """The facts of this machine's CPU, from /proc/cpuinfo (or the text `cpuinfo`): the first
    processor's model name and flags; an unknown CPU has no flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags known, so no bf16 by the hardware rule
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip() and fields:
            break  # the first processor's block is enough: they are alike
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""  # x86; ARM
    name = fields.get("model name") or platform.processor() or "unknown"
    return CpuFacts(name, frozenset(flags.split()))


@dataclass(frozen=True)
class Choice:
    """A run's precision and layout, and how they were decided."""

    precision: str  # fp32 or bf16
    channels_last: bool
    how: str  # given, hardware (no measurement), measured, cached
    images_per_second: Mapping[str, float] = field(default_factory=dict)  # by option_label

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{self.precision}, {layout} ({self.how})"


def option_label(precision: str, channels_last: bool) -> str:
    """'bf16 channels_last', 'fp32 contiguous', ...: an option's name in tables and the cache."""
    return f"{precision} {'channels_last' if channels_last else 'contiguous'}"


def tuning_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """False where NORMCLI_TUNE is 0 (or false, no, off)."""
    return environ.get(TUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def hardware_precision(device: torch.device, facts: CpuFacts | None = None) -> str:
    """What `auto` means without a measurement: bf16 on a CUDA GPU that supports it and on a
    CPU with native bf16, fp32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if (facts or cpu_facts()).native_bf16 else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The training step's autocast for `precision` (disabled for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def candidates(spec: RunSpec, device: torch.device, facts: CpuFacts) -> list[Option]:
    """The (precision, channels_last) options open to `spec` (resolved) on `device`."""
    t = spec.train
    if t.precision != "auto":
        precisions = [t.precision]
    else:
        precisions = ["bf16", "fp32"] if hardware_precision(device, facts) == "bf16" else ["fp32"]
    layouts = [t.channels_last] if t.channels_last is not None else [True, False]
    return [(p, cl) for p in precisions for cl in layouts]


def choose(
    spec: RunSpec,
    device: torch.device,
    facts: CpuFacts | None = None,
    *,
    measure: bool | None = None,
) -> Choice:
    """The precision and layout `spec` (resolved) trains with on `device`: see the module
    docstring. `measure` None: measure on the CPU unless NORMCLI_TUNE=0."""
    t, facts = spec.train, facts or cpu_facts()
    given = t.precision != "auto" and t.channels_last is not None
    options = candidates(spec, device, facts)
    measure = tuning_enabled() if measure is None else measure
    if len(options) == 1 or device.type != "cpu" or not measure:
        precision = options[0][0]  # the given one, else the hardware's
        layout = t.channels_last
        if layout is None:  # the norm's layout (measured on an AMD EPYC: bench/results/levers.md)
            layout = get_norm(spec.model.norm).channels_last
        return Choice(precision, layout, "given" if given else "hardware")
    key = cache_key(spec, facts)
    table = dict(read_cache(key) or {})
    missing = [o for o in options if option_label(*o) not in table]
    how = "cached"
    if missing:
        table.update(measure_options(spec.model, t.per_process_batch, missing))
        write_cache(key, table)
        how = "measured"
    best = max(options, key=lambda o: table[option_label(*o)])
    return Choice(*best, how, {option_label(*o): table[option_label(*o)] for o in options})


def settle(spec: RunSpec, choice: Choice) -> RunSpec:
    """`spec` with the precision and layout of `choice` recorded."""
    train = dataclasses.replace(
        spec.train, precision=choice.precision, channels_last=choice.channels_last
    )
    return dataclasses.replace(spec, train=train)


# ---------------------------------------------------------------------------
# The measurement


def measure_options(
    model: ModelArgs, batch: int, options: Sequence[Option], seconds: float = MEASURE_SECONDS
) -> dict[str, float]:
    """Training images per second of each option: SGD steps of `model` (resolved) on one
    synthetic batch of the run's shape, on the CPU with torch's current threads; the options'
    steps alternate, round after round, and each keeps its fastest step (other processes on
    the machine only ever slow a step down). The global RNG is left as it was."""
    dataset = get_dataset(model.dataset)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *dataset.input_shape, generator=g)
    y = torch.randint(0, dataset.num_classes, (batch,), generator=g)
    with torch.random.fork_rng(devices=[]):
        steps = {o: training_step(model, *o, x, y) for o in options}
        for step in steps.values():
            for _ in range(WARMUP_STEPS):
                step()
        best = dict.fromkeys(steps, math.inf)
        deadline, rounds = time.perf_counter() + seconds, 0
        while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() < deadline):
            for option, step in steps.items():
                start = time.perf_counter()
                step()
                best[option] = min(best[option], time.perf_counter() - start)
            rounds += 1
    return {option_label(*o): batch / max(s, 1e-9) for o, s in best.items()}


def training_step(
    model_args: ModelArgs, precision: str, channels_last: bool, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """One SGD step of a fresh network in this precision and layout, as a function."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model_args.build().to(memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                                foreach=True)  # fmt: skip
    x = x.contiguous(memory_format=layout)
    cpu = torch.device("cpu")

    def step() -> None:
        with autocast(precision, cpu):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# ---------------------------------------------------------------------------
# The cache: one small JSON file per key


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CACHE_HOME/normcli, or ~/.cache/normcli."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "normcli"


def cache_key(spec: RunSpec, facts: CpuFacts, threads: int | None = None) -> dict[str, Any]:
    """What a measurement depends on; `threads` default: torch's current count."""
    return {
        "version": CACHE_VERSION,
        "cpu": facts.model_name,
        "flags": facts.flags_hash,
        "torch": facts.torch_version,
        "model": spec.model.model,
        "norm": spec.model.norm,
        "batch": spec.train.per_process_batch,
        "threads": threads or torch.get_num_threads(),
    }


def cache_path(key: Mapping[str, Any]) -> Path:
    """The file holding the figures of `key`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key['model']}_{key['norm']}_b{key['batch']}_t{key['threads']}_{digest}.json"
    return cache_dir() / "tuning" / name


def read_cache(key: Mapping[str, Any]) -> dict[str, float] | None:
    """The cached images per second by option of `key`; None when there are none (a file
    that does not hold them for exactly this key is measured again and replaced)."""
    try:
        doc = json.loads(cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    table = doc.get("images_per_second") if isinstance(doc, dict) else None
    if doc.get("key") != dict(key) or not isinstance(table, dict):
        return None
    good = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in table.values()
    )
    return {str(k): float(v) for k, v in table.items()} if good else None


def write_cache(key: Mapping[str, Any], table: Mapping[str, float]) -> Path | None:
    """Store the figures of `key` (atomically: concurrent runs may write the same file).
    A cache that cannot be written only costs the next run its measurement: None then."""
    path = cache_path(key)
    doc = {"key": dict(key), "images_per_second": dict(table),
           "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return None
    return path
