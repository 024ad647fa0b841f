"""The one exception type users see."""

from __future__ import annotations


class NormcliError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
