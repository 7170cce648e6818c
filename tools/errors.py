"""One error type for user mistakes (exit 2) and one for failed work (exit 1)."""
from __future__ import annotations


class UserError(Exception):
    """Bad usage or bad input. The message is one line naming the file and line, or the field."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "")
            if field is not None:
                where += f" [{field}]"
            where += ": "
        elif field is not None:
            where = f"{field}: "
        super().__init__(where + " ".join(str(message).split()))


class WorkError(Exception):
    """The work itself failed (a tool crashed, training diverged...)."""

    exit_code = 1
