"""The one validator of stored records: JSON values against dataclass / TypedDict type hints,
and dataclasses built from JSON once they pass."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from normcli.errors import NormcliError


def check_type(value: Any, hint: Any) -> str | None:
    """None when `value` (decoded JSON) fits type `hint`, else what is wrong with it.

    Understands the hints normcli's records use: bool, int, float (an int is accepted),
    str, None, X | Y, list[X], tuple[X, ...], dict[str, X], dataclasses and TypedDicts
    (as JSON objects). Numbers must be finite: JSON from a checkpoint must not smuggle in NaN.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [check_type(value, arg) for arg in args]
        return None if None in problems else next(p for p in problems if p)
    if origin in (list, tuple):
        return _check_items(value, args[0] if args else Any)
    if origin is dict:
        if not isinstance(value, dict):
            return "expected an object"
        return _check_items(list(value.values()), args[1] if args else Any)
    if dataclasses.is_dataclass(hint) or typing.is_typeddict(hint):
        return _check_fields(value, hint)
    if hint not in _SCALARS:
        raise TypeError(f"check_type does not understand {hint!r}")  # a programming error
    return _SCALARS[hint](value)


def _check_number(value: Any, kind: type) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {type(value).__name__}"
    if kind is int and not isinstance(value, int):
        return "expected an integer"
    return None if math.isfinite(value) else f"{value} is not a finite number"


_SCALARS: dict[Any, Any] = {
    bool: lambda v: None if isinstance(v, bool) else "expected true or false",
    int: lambda v: _check_number(v, int),
    float: lambda v: _check_number(v, float),
    str: lambda v: None if isinstance(v, str) else "expected a string",
    type(None): lambda v: None if v is None else "expected null",
    Any: lambda v: None,
}


def _check_items(value: Any, item: Any) -> str | None:
    if not isinstance(value, list):
        return "expected a list"
    for i, v in enumerate(value):
        problem = check_type(v, item)
        if problem:
            return f"item {i}, {problem}"
    return None


def _check_fields(value: Any, cls: Any) -> str | None:
    if not isinstance(value, dict):
        return "expected an object"
    hints = typing.get_type_hints(cls)
    # A stored record holds every field, defaults included: a file says what it meant.
    required = set(hints) if dataclasses.is_dataclass(cls) else set(cls.__required_keys__)
    for name in sorted(required - set(value)):
        return f"{name!r} missing"
    for name in value:
        if name not in hints:
            return f"unknown field {name!r}"
        problem = check_type(value[name], hints[name])
        if problem:
            return f"{name!r} has the wrong type ({problem})"
    return None


def from_json(cls: type[Any], value: Any, what: str) -> Any:
    """Build dataclass `cls` from a decoded JSON object, after checking every field's type
    against its hint; NormcliError names `what` and the first problem."""
    problem = check_type(value, cls)
    if problem:
        raise NormcliError(f"{what}: {problem}")
    hints = typing.get_type_hints(cls)
    # JSON has no tuples; the records' tuple fields are rebuilt from lists.
    return cls(**{
        k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in value.items()
    })  # fmt: skip
