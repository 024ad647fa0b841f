"""The grid of a sweep: {option: [values]} plus fixed options expanded into named `Point`s."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from normcli.errors import NormcliError

_NAME_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-=,")
_MAX_NAME = 200  # leaves room for a suffix within the usual 255-byte file-name limit
_SHOWN = 4  # how many point names a message lists before "+N more"
# Far more runs than a sweep of small CNNs needs; a bigger grid is a typo (a range written out
# by a script) and would take minutes and gigabytes to expand, check and record.
MAX_POINTS = 10_000


@dataclass(frozen=True)
class Point:
    """One run of a sweep: a unique file-safe name and its full options (treat as read-only)."""

    name: str
    options: dict = field(hash=False)


def format_value(value: Any) -> str:
    """A short, file-name-safe spelling of one option value (floats compact: 1e-4, 0.5)."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = _compact_float(value)
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        raise NormcliError(f"option value {value!r} is not a number, a word, true/false or null")
    return "".join(c if c in _NAME_SAFE else "~" for c in text) or "~"


def _compact_float(value: float) -> str:
    """The shorter of the plain and the exponent spelling that both read back as `value`."""
    if not math.isfinite(value):
        return repr(value)
    plain = repr(value)
    plain = plain[:-2] if plain.endswith(".0") else plain
    for digits in range(17):
        exp = f"{value:.{digits}e}"
        if float(exp) == value:
            break
    mantissa, power = exp.split("e")
    exp = f"{mantissa}e{int(power)}"
    return exp if len(exp) < len(plain) or "e" in plain else plain


def expand_grid(swept: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any]) -> list[Point]:
    """All combinations of the swept values (key order, then value order) on top of `fixed`."""
    if not swept:
        raise NormcliError("nothing to sweep: give at least one option with a list of values")
    for key, values in swept.items():
        _check_list(key, values, fixed)
    count = math.prod(len(values) for values in swept.values())
    if count > MAX_POINTS:
        sizes = " x ".join(f"{len(values):,} {key}" for key, values in swept.items())
        raise NormcliError(
            f"the grid has {count:,} points ({sizes}); a sweep runs at most {MAX_POINTS:,}"
        )
    for key, values in swept.items():
        _check_repeats(key, values)
    keys = list(swept)
    labels = {key: _safe_key(key) for key in keys}
    points = []
    for combo in itertools.product(*(swept[k] for k in keys)):
        name = "_".join(f"{labels[k]}-{format_value(v)}" for k, v in zip(keys, combo, strict=True))
        if len(name) > _MAX_NAME:
            # A hash of the full name keeps long names unique.
            digest = hashlib.sha256(name.encode()).hexdigest()[:10]
            name = f"{name[: _MAX_NAME - 11]}-{digest}"
        points.append(Point(name, {**fixed, **dict(zip(keys, combo, strict=True))}))
    seen: dict[str, Point] = {}
    for point in points:
        if point.name in seen:
            raise NormcliError(
                f"two runs of the sweep would both be named {point.name}; "
                "use values that differ in their letters and digits"
            )
        seen[point.name] = point
    return points


def _check_list(key: str, values: Any, fixed: Mapping[str, Any]) -> None:
    """Refuse a swept option that is also fixed, not a list, or empty."""
    if key in fixed:
        raise NormcliError(f"option {key} is both swept and fixed; give it once")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise NormcliError(f"option {key}: the swept values must be a list")
    if not values:
        raise NormcliError(f"option {key}: the list of values to sweep is empty")


def _check_repeats(key: str, values: Sequence[Any]) -> None:
    """Refuse a value given twice. Equal, not identical: 1 and 1.0 are the same run (a dict
    compares keys so, and finds them at once; values it cannot hold are compared one by one)."""
    seen: dict[Any, None] = {}
    for i, value in enumerate(values):
        try:
            repeat = value in seen
            seen[value] = None
        except TypeError:
            repeat = any(value == earlier for earlier in values[:i])
        if repeat:
            raise NormcliError(f"option {key}: value {value!r} is given twice")


def _safe_key(key: str) -> str:
    """An option name as it appears in run names: safe characters, no leading dot."""
    if not isinstance(key, str) or not key:
        raise NormcliError(f"option name {key!r} must be a non-empty word")
    text = "".join(c if c in _NAME_SAFE else "~" for c in key)
    return "~" + text[1:] if text.startswith(".") else text


def names(listed: Sequence[str]) -> str:
    """The first few point names for a message, then how many more."""
    shown = ", ".join(listed[:_SHOWN])
    return shown + (f" (+{len(listed) - _SHOWN} more)" if len(listed) > _SHOWN else "")
