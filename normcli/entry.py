"""The process entry point of `normcli` and `python -m normcli`; nothing imports it.

Kept tiny on purpose: it sets up signals, the standard streams and the OpenMP policy
(normcli.runtime), then imports the CLI (torch, typer: seconds), so that an interrupt at
any moment ends the same way.
"""

from __future__ import annotations

import sys

from normcli.runtime import (
    configure_streams,
    configure_threads,
    exit_on_signals,
    install_signal_handlers,
    interrupt_exit_code,
    interrupt_message,
    release_stdout,
)


def run() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    configure_streams()
    configure_threads()
    try:
        try:
            from normcli.cli import main

            code = main()
        finally:
            exit_on_signals()
    except KeyboardInterrupt:  # during the imports (main() reports its own)
        code = interrupt_exit_code()
        print(f"normcli: error: {interrupt_message()}", file=sys.stderr)
    release_stdout()
    sys.exit(code)
