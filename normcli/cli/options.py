"""What the commands take: the shared option types, and the run options, each declared once as
a field of the run description (normcli.config) and turned into a Typer option here.

`train` takes each run option as its type; `sweep` takes comma lists of the same options.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from normcli.config import ModelArgs, RunSpec, TrainArgs
from normcli.errors import NormcliError

_RUN_RECORDS: tuple[type, ...] = (ModelArgs, TrainArgs)


def run_option_fields(records: Sequence[type] = _RUN_RECORDS) -> dict[str, dataclasses.Field]:
    """The run options users type, by name: the records' fields that carry help text."""
    return {f.name: f for r in records for f in dataclasses.fields(r) if f.metadata.get("help")}


@functools.cache
def _choice_enum(name: str, choices: tuple[str, ...]) -> type[Enum]:
    """A closed choice for --help (one per option), from the library's table of names."""
    return Enum(name.title().replace("_", ""), {c: c for c in choices}, type=str)


def _choices(field: dataclasses.Field) -> type[Enum] | None:
    table = field.metadata.get("choices")
    return None if table is None else _choice_enum(field.name, tuple(table))


_FIELDS = run_option_fields()
Norm = _choices(_FIELDS["norm"])


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# Shared option types: declared once so every command's help reads the same; those that are
# also run options take the run option's help.
DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Data folder. Default: $NORMCLI_DATA, else ./data.", show_default=False),
]
DeviceOpt = Annotated[Device, typer.Option(help="auto picks cuda when a GPU is there.")]
LimitOpt = Annotated[
    int | None, typer.Option(help=_FIELDS["limit"].metadata["help"], show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
CkptsArg = Annotated[list[Path], typer.Argument(help="Checkpoints written by `normcli train`.")]
NormOpt = Annotated[Norm, typer.Option(help=_FIELDS["norm"].metadata["help"])]
GroupsOpt = Annotated[
    int | None, typer.Option(help=_FIELDS["groups"].metadata["help"], show_default=False)
]
WsOpt = Annotated[
    bool | None,
    typer.Option("--ws/--no-ws", help=_FIELDS["ws"].metadata["help"], show_default=False),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(help="Registry name (see `normcli summary --list`).", show_default=False),
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="KEY=VALUE: only the runs with this option value, e.g. epochs=15 (repeatable; "
        "KEY=A,B for either value).",
        show_default=False,
    ),
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace existing output files.")]
EvalBatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _parameter(field: dataclasses.Field, hint: Any, as_lists: bool) -> inspect.Parameter:
    """One run option as a keyword parameter of a Typer command."""
    kind, default, flag = _choices(field) or hint, field.default, _flag(field.name)
    if _choices(field) and default is not None:
        default = kind(default)
    switch = typing.get_args(kind) == (bool, type(None)) or kind is bool
    decls = [f"{flag}/--no-{flag[2:]}" if switch and not as_lists else flag]
    if as_lists:
        kind, default = str | None, None
    option = typer.Option(*decls, help=field.metadata["help"], show_default=default is not None)
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option],
        default=default,
    )  # fmt: skip


def run_option_parameters(
    as_lists: bool = False, records: Sequence[type] = _RUN_RECORDS
) -> list[inspect.Parameter]:
    """The run options as keyword parameters for a Typer command (typed from the records'
    type hints, helped from their fields); `as_lists`: each takes a comma-separated list."""
    hints = {k: v for r in records for k, v in typing.get_type_hints(r).items()}
    return [_parameter(f, hints[n], as_lists) for n, f in run_option_fields(records).items()]


def with_run_options(as_lists: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command also takes every run option (Typer reads `__signature__`)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=[*own, *run_option_parameters(as_lists)])
        return fn

    return decorate


def spec_from_options(options: dict[str, Any]) -> RunSpec:
    """The run description from parsed option values."""
    values = {k: v.value if isinstance(v, Enum) else v for k, v in options.items()}
    return RunSpec.from_options(**values).resolve()


# Parameters whose name opens a library message: the CLI shows them as the flags users typed.
_FLAG_NAMES = frozenset({*_FIELDS, "n", "cols", "device"})


def as_flags(message: str) -> str:
    """A library message that starts with a parameter's name, with the flag instead."""
    first, _, rest = message.partition(" ")
    if first in _FLAG_NAMES and rest:
        return f"{_flag(first)} {rest}"
    return message


def parse_list(name: str, text: str) -> list[Any]:
    """A comma-separated list of run option `name`'s values, each of the option's type."""
    hint = {k: v for r in _RUN_RECORDS for k, v in typing.get_type_hints(r).items()}[name]
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    choices, flag = _choices(_FIELDS[name]), _flag(name)
    values = []
    for item in (part.strip() for part in text.split(",")):
        if choices and item not in choices.__members__:
            raise NormcliError(f"{flag}: {item!r} is not one of {', '.join(choices.__members__)}")
        values.append(_convert(item, kinds[0], flag))
    return values


def _convert(item: str, kind: type, flag: str) -> Any:
    """One value of a comma list as `kind` (int, float, bool, str)."""
    if kind is bool:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if item.lower() not in words:
            raise NormcliError(f"{flag}: {item!r} is not true or false")
        return words[item.lower()]
    try:
        return kind(item)
    except ValueError:
        raise NormcliError(f"{flag}: {item!r} is not a valid {kind.__name__}") from None
