"""The one exception type users see, and any exception as one line."""

from __future__ import annotations

USAGE = 2  # exit code of a problem the user can fix (as Click's usage errors)


class NormcliError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(exc: BaseException) -> str:
    """An exception as one short line: 'Type: first line of the message' (a NormcliError's
    message alone)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(exc, NormcliError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
