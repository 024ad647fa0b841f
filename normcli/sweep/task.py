"""normcli runs as sweep points: the task that trains one point into its output file, and what
the sweep needs to trust a point's file (`check_point_output`) and to know two spellings of
one run for the same point (`point_identity`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError

# What the file at a point's output is to that point (see `examine_output`).
MISSING, UNUSABLE, UNFINISHED, FINISHED = "missing", "unusable", "unfinished", "finished"

# Options a point may leave to the machine that runs it, and the value that says so: the
# thread count, and the precision and memory layout that normcli.tuning picks when the run
# starts. A checkpoint records what ran; any recorded value matches a point that left it open.
DECIDED_AT_START = {"threads": None, "precision": "auto", "channels_last": None}


def train_point(
    options: dict, output: str, *, data_dir: str | None = None, device: str = "cpu"
) -> dict:
    """Sweep task: train one point's run into `output` and return its final metrics. A file
    already there holding this run is a previous attempt (its worker died): it is resumed from
    its last saved epoch, to exactly the weights an uninterrupted run reaches. A file that is
    not a checkpoint at all (truncated, empty) is replaced; a checkpoint of another run is
    refused (NormcliError), never replaced."""
    # Imported here: the engine imports this package on every Ray worker, training or not.
    from normcli.config import RunSpec
    from normcli.study import final_metrics
    from normcli.train import resume_training, train

    path = Path(output)
    state, _ = examine_output(options, path)
    if state in (UNFINISHED, FINISHED):
        result = resume_training(path, data_dir=data_dir, device=device)
    else:
        spec = RunSpec.from_options(**options)
        overwrite = state == UNUSABLE
        result = train(spec, data_dir=data_dir, device=device, out=path, overwrite=overwrite)
    return final_metrics(result.history) | {"params": result.params}


def examine_output(options: Mapping[str, Any], path: str | os.PathLike) -> tuple[str, str]:
    """(state, why) of the file at `path` for the point with these options: MISSING, UNUSABLE
    (not a safetensors file, truncated, tensors that do not fit the model), UNFINISHED (this
    run, fewer epochs than it is set to) or FINISHED. A normcli checkpoint of another run, or
    one this normcli cannot read (a newer format), raises NormcliError: it is someone's run."""
    from normcli.checkpoint import CheckpointMeta, load_checkpoint, read_file
    from normcli.study import show_value

    path = Path(path)
    if not path.exists():
        return MISSING, f"{path} is missing"
    try:
        raw, _ = read_file(path)
    except NormcliError as e:
        return UNUSABLE, str(e)
    meta = CheckpointMeta.from_strings(raw, str(path))
    expected = _resolved(options)
    recorded = meta.run.options()
    differing = [k for k in expected if expected[k] != recorded[k] and not _left_open(k, expected)]
    if differing:
        there, here = recorded, expected
        shown = "; ".join(
            f"{k} {show_value(there[k])} there, {show_value(here[k])} here" for k in differing
        )
        raise NormcliError(
            f"{path} holds another run ({shown}); move it away or use another sweep folder"
        )
    try:
        load_checkpoint(path)  # its tensors fit the model it describes
    except NormcliError as e:
        return UNUSABLE, str(e)
    done, total = len(meta.history), meta.train_args.epochs
    if done < total:
        return UNFINISHED, f"{path} holds {done} of {total} epochs"
    return FINISHED, ""


def check_point_output(options: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """None when the file at `path` is the point's finished run, else why not (the point is
    then run again); NormcliError for a checkpoint of another run (see `examine_output`)."""
    state, why = examine_output(options, path)
    return None if state == FINISHED else why


def point_identity(options: Mapping[str, Any]) -> str:
    """A point's identity: its run with every default filled in, as canonical JSON, so that
    an option spelled out at its default (--momentum 0.9, --l1 0) is the same point as one
    left out. Options that are not a valid run are taken as given."""
    try:
        resolved = _resolved(options)
    except (NormcliError, TypeError):
        resolved = dict(options)
    return json.dumps(resolved, sort_keys=True, default=repr)


def _left_open(key: str, options: Mapping[str, Any]) -> bool:
    """Whether the point leaves option `key` to the machine that runs it."""
    return key in DECIDED_AT_START and options[key] == DECIDED_AT_START[key]


def _resolved(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of the point's run, resolved; `threads` None where the point leaves it to
    the machine that runs it (resolving here would give this machine's count)."""
    from normcli.config import RunSpec

    resolved = RunSpec.from_options(**options).resolve().options()
    if options.get("threads") is None:
        resolved["threads"] = None
    return resolved

