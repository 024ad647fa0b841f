"""How the commands speak: error and warning lines on stderr, JSON on stdout."""

from __future__ import annotations

import json
import math
import sys
from typing import Any


def fail(message: str) -> None:
    """The one error line of a failed command."""
    print(f"normcli: error: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"normcli: warning: {message}", file=sys.stderr)


def warn_study(study: Any) -> None:
    """The study's notes as warnings: options that split the groups, runs left out."""
    if study.split_by:
        warn(f"{study.describe_split()}; to keep some, e.g. --where {study.example()}")
    for note in study.notes:
        warn(note)


def print_json(doc: Any) -> None:
    """One JSON document on stdout; a non-finite number is written as null (JSON has none)."""
    print(json.dumps(finite(doc), indent=2, allow_nan=False))


def finite(value: Any) -> Any:
    """`value` with every non-finite float (in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
