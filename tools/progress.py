"""Progress and logs on stderr (results go to stdout). rich is imported on first use, so that
`tools --help` and every module importing ``log`` start without it (tests/tools/test_cli.py)."""
from __future__ import annotations

import contextlib
import sys

_CONSOLES: dict = {}


def _console(name: str):
    if name not in _CONSOLES:
        from rich.console import Console

        _CONSOLES[name] = (Console(stderr=True, highlight=False) if name == "err"
                           else Console(highlight=False, soft_wrap=True))
    return _CONSOLES[name]


def __getattr__(name: str):
    """``err`` (stderr) and ``out`` (stdout): rich consoles made when first asked for."""
    if name in ("err", "out"):
        return _console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log(msg: str) -> None:
    _console("err").print(msg, markup=False)


@contextlib.contextmanager
def progress(description: str, total: int | None = None, unit: str = "items"):
    """A rich progress bar with a rate column; yields ``advance(n=1)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=_console("err"), transient=False, disable=not sys.stderr.isatty() and False) as p:
        task = p.add_task(description, total=total, rate="")

        def advance(n: int = 1):
            p.advance(task, n)
            t = p.tasks[task]
            if t.elapsed:
                p.update(task, rate=f"{t.completed / t.elapsed:.2f} {unit}/s")
        yield advance
