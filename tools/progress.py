"""Progress and logs on stderr (results go to stdout)."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def log(msg: str) -> None:
    err.print(msg, markup=False)


@contextlib.contextmanager
def progress(description: str, total: int | None = None, unit: str = "items"):
    """A rich progress bar with a rate column; yields ``advance(n=1)``."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=err, transient=False, disable=not sys.stderr.isatty() and False) as p:
        task = p.add_task(description, total=total, rate="")

        def advance(n: int = 1):
            p.advance(task, n)
            t = p.tasks[task]
            if t.elapsed:
                p.update(task, rate=f"{t.completed / t.elapsed:.2f} {unit}/s")
        yield advance
