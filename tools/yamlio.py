"""One YAML reader for every verb: a missing file, a non-UTF-8 byte or malformed YAML is a
UserError naming the file (and the line, where the parser knows it)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def read_yaml(path: str | os.PathLike, *, what: str = "YAML file", default=None):
    """The parsed document (``default`` for an empty file)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found", path=str(p)) from None
    except IsADirectoryError:
        raise UserError(f"{what} expected, found a folder", path=str(p)) from None
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{what} is not UTF-8 (byte 0x{e.object[e.start]:02x})", path=str(p), line=line) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())[:160]
        raise UserError(f"malformed YAML ({problem})", path=str(p),
                        line=None if mark is None else mark.line + 1) from None
    return default if doc is None else doc
