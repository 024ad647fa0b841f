"""The figure of per_device_batch.sh: final test error against per-process batch, one line
per kind of run (BN, BN with synchronized statistics, GN), from the checkpoints' metadata.

    python examples/plot_per_device_batch.py OUT.png CHECKPOINT...
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from normcli.checkpoint import read_metadata
from normcli.norms import norm_label
from normcli.plots import save_figure


def main(argv: list[str]) -> None:
    out, paths = Path(argv[0]), [Path(p) for p in argv[1:]]
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    titles = set()
    for path in paths:
        meta = read_metadata(path)
        m, t = meta.model_args, meta.train_args
        kind = norm_label(m.norm, m.groups, t.l1, bool(m.ws))
        kind += " (synchronized over the global batch)" if t.sync_bn else ""
        error = 100.0 - meta.history[-1]["test_accuracy"]
        lines[kind].append((t.per_process_batch, error))
        epochs = f"{t.epochs} epoch{'s' if t.epochs != 1 else ''}"
        titles.add(f"{meta.dataset.upper()} ({m.model}), {t.world_size} processes, {epochs}")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for kind, points in lines.items():
        points.sort()
        ax.plot([b for b, _ in points], [e for _, e in points], marker="o", label=kind)
    sizes = sorted({b for points in lines.values() for b, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("per-process batch (images each process normalizes per step)")
    ax.set_ylabel("final test error (%)")
    ax.set_title("; ".join(sorted(titles)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
