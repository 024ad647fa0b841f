"""normcli runs as sweep points: the task that trains one point into its output file."""

from __future__ import annotations

from pathlib import Path


def train_point(
    options: dict, output: str, *, data_dir: str | None = None, device: str = "cpu"
) -> dict:
    """Sweep task: train one point's run into `output` and return its final metrics. A file
    already there is a previous attempt of this point (its worker died): it is resumed from
    its last saved epoch, to exactly the weights an uninterrupted run reaches."""
    # Imported here: the engine imports this package on every Ray worker, training or not.
    from normcli.config import RunSpec
    from normcli.study import final_metrics
    from normcli.train import resume_training, train

    path = Path(output)
    if path.exists():
        result = resume_training(path, data_dir=data_dir, device=device)
    else:
        spec = RunSpec.from_options(**options)
        result = train(spec, data_dir=data_dir, device=device, out=path)
    return final_metrics(result.history) | {"params": result.params}
