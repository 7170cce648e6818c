"""Atomic writes, hashing and strict readers that name file and line on bad input."""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import os
import re
import tempfile
import zlib
from json import decoder, scanner
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError, excerpt

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


GZIP_MAGIC = b"\x1f\x8b"
CSV_FIELD_LIMIT = 1 << 26   # 64 MiB: csv's default (128 KiB) is smaller than some real notes and answers


def _gz_errors() -> tuple:
    return (EOFError, gzip.BadGzipFile, zlib.error)


def gz_damage_line(path: str | os.PathLike) -> int:
    """The line (of the uncompressed text) where a damaged gzip file stops being readable: all data
    before the damage is decompressed in small steps and its newlines counted."""
    lines = 0
    d = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1024)
                if not chunk:
                    break
                while chunk:
                    lines += d.decompress(chunk).count(b"\n")
                    if d.eof:               # next member (gzip allows several), zero padding skipped
                        chunk = d.unused_data.lstrip(b"\x00")
                        d = zlib.decompressobj(wbits=31)
                    else:
                        chunk = b""
    except zlib.error:
        pass
    return lines + 1


def gzip_error(path: str | os.PathLike, exc: BaseException) -> UserError:
    """A one-line diagnosis of an unreadable .gz input (not gzip at all, truncated, corrupt)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if head != GZIP_MAGIC:
        return UserError("not a gzip file, though its name ends in .gz (rename it, or compress it with gzip)",
                         path=str(path))
    line = gz_damage_line(path)
    if isinstance(exc, EOFError):
        return UserError("truncated gzip file: the compressed data ends before its end-of-stream marker "
                         "(an interrupted download or copy?)", path=str(path), line=line)
    if "Not a gzipped file" in str(exc):
        return UserError("corrupt gzip data (bytes after the end of the compressed data are not gzip: a damaged "
                         "or appended file?)", path=str(path), line=line)
    return UserError(f"corrupt gzip data ({' '.join(str(exc).split()) or type(exc).__name__})", path=str(path),
                     line=line)


def open_binary(path: str | os.PathLike):
    """The file's bytes, decompressed when the name ends in .gz."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (.gz too). Lines are decoded one at a time, so a
    byte that is not UTF-8 is reported on its own line wherever it sits (a text-mode reader decodes
    a whole buffer ahead and would name the wrong line); a leading BOM is dropped; an unreadable
    .gz is diagnosed (not gzip, truncated, corrupt) with the line where it stops."""
    p = Path(path)
    n = 0
    try:
        with open_binary(p) as f:
            for n, raw in enumerate(f, 1):
                try:
                    s = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"not UTF-8 (byte 0x{raw[e.start]:02x})", path=str(p), line=n) from None
                if n == 1 and s.startswith("\ufeff"):
                    s = s[1:]
                yield n, s
    except _gz_errors() as e:
        raise gzip_error(p, e) from None


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found", path=str(p))
    if p.is_dir():
        raise UserError(f"expected a {what}, got a directory", path=str(p))
    if p.stat().st_size == 0:
        raise UserError(f"{what} is empty", path=str(p))
    return p


class RepeatedKey(ValueError):
    """A JSON object names the same key twice (``json`` would keep the last value silently)."""

    def __init__(self, key: str, start: int | None = None):
        super().__init__(key)
        self.key, self.start = key, start


def _no_repeats(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise RepeatedKey(k)
            seen.add(k)
    return d


def json_loads(text: str):
    """``json.loads`` that refuses an object with a repeated key (raises RepeatedKey)."""
    return json.loads(text, object_pairs_hook=_no_repeats)


def _repeat_line(text: str, key: str) -> int | None:
    """The line of the second occurrence of ``key`` in the first object that repeats it (a slow,
    pure-Python parse: only run to report the error)."""
    class Locator(json.JSONDecoder):
        def __init__(self):
            super().__init__()

            def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
                start = s_and_end[1]

                def hook(pairs):
                    try:
                        return _no_repeats(pairs)
                    except RepeatedKey as e:
                        raise RepeatedKey(e.key, start) from None
                return decoder.JSONObject(s_and_end, strict, scan_once, object_hook, hook, memo)

            self.parse_object = parse_object
            self.scan_once = scanner.py_make_scanner(self)

    try:
        Locator().decode(text)
    except RepeatedKey as e:
        if e.start is None:
            return None
        hits = [m.start() for m in re.finditer(re.escape(json.dumps(e.key, ensure_ascii=False)) + r"\s*:", text[e.start:])]
        pos = e.start + (hits[1] if len(hits) > 1 else 0)
        return text.count("\n", 0, pos) + 1
    except (ValueError, RecursionError):
        return None
    return None


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """A whole JSON document (.gz too): bad bytes, syntax errors and repeated keys name file:line."""
    p = require_file(path, what)
    try:
        with open_binary(p) as f:
            data = f.read()
    except _gz_errors() as e:
        raise gzip_error(p, e) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (byte 0x{data[e.start]:02x})", path=str(p),
                        line=data.count(b"\n", 0, e.start) + 1) from None
    text = text[1:] if text.startswith("\ufeff") else text
    try:
        return json_loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=str(p), line=e.lineno) from None
    except RepeatedKey as e:
        raise UserError(f"repeated key {e.key!r} in one object (JSON would keep only the last value)",
                        path=str(p), line=_repeat_line(text, e.key)) from None
    except RecursionError:
        raise UserError("JSON nested too deeply", path=str(p)) from None


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Yield JSON objects; a malformed line, a repeated key, a missing field, a bad byte or a
    damaged .gz names file:line."""
    for _, obj in read_jsonl_numbered(path, required):
        yield obj


def read_jsonl_numbered(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) pairs, with read_jsonl's checks (blank lines keep their numbers)."""
    p = require_file(path, "JSONL file")
    for lineno, line in text_lines(p):
        if not line.strip():
            continue
        try:
            obj = json_loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=str(p), line=lineno) from None
        except RepeatedKey as e:
            raise UserError(f"repeated key {e.key!r} in one object (JSON would keep only the last value)",
                            path=str(p), line=lineno, field=e.key) from None
        except RecursionError:
            raise UserError("JSON nested too deeply", path=str(p), line=lineno) from None
        if not isinstance(obj, dict):
            raise UserError("expected a JSON object", path=str(p), line=lineno)
        for k in required:
            if k not in obj:
                raise UserError(f"missing field {k!r}", path=str(p), line=lineno, field=k)
        yield lineno, obj


def _csv_error(e: csv.Error) -> str:
    msg = str(e)
    if "field larger than field limit" in msg:
        size = f"{CSV_FIELD_LIMIT >> 20} MiB" if CSV_FIELD_LIMIT >= 1 << 20 else f"{CSV_FIELD_LIMIT} bytes"
        return f"a field is larger than {size} (an unterminated quote, or not a CSV file?)"
    return f"malformed CSV row ({msg})"


def read_csv(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Yield CSV rows as dicts (quoted newlines allowed; fields up to CSV_FIELD_LIMIT); bad rows,
    bad bytes and damaged .gz name file:line."""
    for _, row in read_csv_numbered(path, required):
        yield row


def read_csv_numbered(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line where the record starts, row) pairs, with read_csv's checks."""
    p = require_file(path, "CSV file")
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader((s for _, s in text_lines(p)), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError("CSV file has no header", path=str(p)) from None
    except csv.Error as e:
        raise UserError(f"{_csv_error(e)} in the header", path=str(p), line=1) from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"missing column {missing[0]!r} (columns: {excerpt(', '.join(header))})", path=str(p),
                        line=1, field=missing[0])
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(_csv_error(e), path=str(p), line=start) from None
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"row has {len(row)} fields, header has {len(header)}", path=str(p), line=start)
        yield start, dict(zip(header, row))


