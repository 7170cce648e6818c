"""Atomic writes, hashing and strict readers that name file and line on bad input."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temp file beside ``path`` and rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding, "newline": ""}
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows) -> int:
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def _open_text(path: Path):
    if str(path).endswith(".gz"):
        import gzip
        return gzip.open(path, "rt", encoding="utf-8", errors="strict", newline="")
    return open(path, "r", encoding="utf-8", errors="strict", newline="")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found", path=str(p))
    if p.is_dir():
        raise UserError(f"expected a {what}, got a directory", path=str(p))
    if p.stat().st_size == 0:
        raise UserError(f"{what} is empty", path=str(p))
    return p


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Yield JSON objects; a malformed line, a missing field or a bad byte names file:line."""
    p = require_file(path, "JSONL file")
    lineno = 0
    with _open_text(p) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=str(p), line=lineno) from None
                if not isinstance(obj, dict):
                    raise UserError("expected a JSON object", path=str(p), line=lineno)
                for k in required:
                    if k not in obj:
                        raise UserError(f"missing field {k!r}", path=str(p), line=lineno, field=k)
                yield obj
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 (byte 0x{e.object[e.start]:02x})", path=str(p), line=lineno + 1) from None


def read_csv(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Yield CSV rows as dicts (quoted newlines allowed); bad rows name file:line."""
    p = require_file(path, "CSV file")
    with _open_text(p) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError("CSV file has no header", path=str(p)) from None
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 (byte 0x{e.object[e.start]:02x})", path=str(p), line=1) from None
        except csv.Error as e:
            raise UserError(f"malformed CSV header ({e})", path=str(p), line=1) from None
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(f"missing column {missing[0]!r} (columns: {', '.join(header)})", path=str(p), line=1, field=missing[0])
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 (byte 0x{e.object[e.start]:02x})", path=str(p), line=reader.line_num + 1) from None
            except csv.Error as e:
                raise UserError(f"malformed CSV row ({e})", path=str(p), line=reader.line_num) from None
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(f"row has {len(row)} fields, header has {len(header)}", path=str(p), line=reader.line_num)
            yield dict(zip(header, row))


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
