"""One error type for user mistakes (exit 2) and one for failed work (exit 1)."""
from __future__ import annotations

EXCERPT_CHARS = 80  # what an error line quotes of one input value (a column list, a field, a line)
MESSAGE_CHARS = 400  # the longest message an error line carries (after the file:line [field] part)


def excerpt(text, limit: int = EXCERPT_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters and saying how long it was: an error about a
    50 MB one-line file quotes its start, never the whole line."""
    raw = str(text)
    head = " ".join(raw[: limit * 4].split())
    if len(head) <= limit and len(raw) <= limit * 4:
        return head
    return f"{head[:limit]}... [cut: {len(raw):,} characters]"


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
        super().__init__(where + excerpt(message, MESSAGE_CHARS))


class WorkError(Exception):
    """The work itself failed (a tool crashed, training diverged...)."""

    exit_code = 1
