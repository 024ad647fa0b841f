"""The Typer app: one function per command, each in the module of its area (train, report,
plot, sweep, study_report); each parses, calls the library, prints.

Data goes to stdout (a path, or JSON with --json); progress, tables, hints and
errors go to stderr. Errors are mapped to one line and an exit code in `main`:
2 for a problem the user can fix, 1 for an internal error or a failed write to
stdout, 130 / 143 when interrupted by SIGINT / SIGTERM, 141 (quietly) when the
reader of stdout went away (normcli.runtime). The process entry point is `normcli.entry.run`.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated

import typer

from normcli import __version__
from normcli.cli.data import data
from normcli.cli.options import as_flags
from normcli.cli.plot import plot
from normcli.cli.printing import fail
from normcli.cli.report import eval_, history, misclassified, summary
from normcli.cli.study_report import report
from normcli.cli.sweep import sweep
from normcli.cli.train import train
from normcli.errors import NormcliError
from normcli.runtime import (
    BROKEN_PIPE,
    INTERRUPTED,
    StdoutError,
    interrupt_exit_code,
    interrupt_message,
)

app = typer.Typer(
    name="normcli",
    help="Compare BatchNorm, LayerNorm and GroupNorm in small CNNs on MNIST and CIFAR-10.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
_COMMANDS = {"train": train, "eval": eval_, "misclassified": misclassified, "plot": plot,
            "history": history, "sweep": sweep, "summary": summary,
            "report": report, "data": data}  # fmt: skip
for name, command in _COMMANDS.items():
    app.command(name)(command)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """Run the app; map every error to one stderr line and an exit code (see the module doc)."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = _run_app(args, debug="--debug" in args)
    try:
        sys.stdout.flush()  # a full stdout is only found out when the data is flushed
    except StdoutError as e:
        return _stdout_exit_code(e.error) if code == 0 else code
    return code


def _run_app(args: list[str], debug: bool) -> int:
    try:
        result = app(args=args, prog_name="normcli", standalone_mode=False)
        if result == INTERRUPTED:  # Typer's answer to an interrupt: exit 130, nothing said
            fail(interrupt_message())
            return interrupt_exit_code()
        return result if isinstance(result, int) else 0
    except NormcliError as e:
        fail(as_flags(str(e)))
        return interrupt_exit_code() if e.exit_code == INTERRUPTED else e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:  # shell completion ends with sys.exit
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except typer.TyperException as e:  # usage errors: bad option, bad value, missing argument
        fail(" ".join(e.format_message().replace("Value error, ", "").split()))
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        fail(interrupt_message())
        return interrupt_exit_code()
    except StdoutError as e:  # printing the result failed, not the work
        return _stdout_exit_code(e.error)
    except Exception as e:  # an internal error: still one line, unless --debug
        if debug:
            traceback.print_exc()
        fail(f"internal error: {type(e).__name__}: {e}".splitlines()[0])
        if not debug:
            print("rerun with --debug for the traceback", file=sys.stderr)
        return 1


def _stdout_exit_code(error: OSError | ValueError) -> int:
    if isinstance(error, BrokenPipeError):  # the reader has all it wanted (`| head -1`)
        return BROKEN_PIPE
    reason = getattr(error, "strerror", None) or str(error)
    fail(f"cannot write to standard output ({reason})")
    return 1
