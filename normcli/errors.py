"""The one exception type users see."""

from __future__ import annotations

USAGE = 2  # exit code of a problem the user can fix (as Click's usage errors)


class NormcliError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
