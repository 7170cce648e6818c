"""The notes CSV (``NOTEEVENTS.csv[.gz]``, ``discharge.csv.gz``...): the header and version, the
blocks of whole records the main process hands out, and the row parsers the workers run on them
(Arrow's CSV reader; the strict ``csv`` module as the fallback that names the bad line).

A newline ends a record when the number of quotes before it is even: TEXT holds quoted newlines,
and quotes inside fields are doubled."""
from __future__ import annotations

import csv
import gzip
import io
import os
import zlib
from itertools import repeat
from pathlib import Path
from typing import Iterator

from tools.errors import UserError
from tools.io import gzip_error

from .notes import REQUIRED, REQUIRED_IV, WANT, check_version

BLOCK = 4 << 20            # bytes of CSV per task
MAX_RECORD = 256 << 20     # a "record" longer than this is an unterminated quote
MAX_HEADER = 1 << 20


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        raw = open(path, "rb")
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    f = open(path, "rb")
    return f, f


def _gz_errors() -> tuple:
    return (EOFError, gzip.BadGzipFile, zlib.error)


def read_csv_header(path: Path, version: str = "auto") -> dict:
    f, _ = _open_binary(path)
    try:
        with f:
            first = f.readline(MAX_HEADER + 1)
    except _gz_errors() as e:
        raise gzip_error(path, e) from None
    return _parse_header(path, first, version)


def _parse_header(path: Path, first: bytes, version: str = "auto") -> dict:
    """The columns of the header line; the MIMIC version from them (NOTE_ID: MIMIC-IV-Note, else
    MIMIC-III NOTEEVENTS) unless ``version`` says which."""
    if not first.strip():
        raise UserError("CSV file is empty (no header)", path=str(path), line=1)
    if len(first) > MAX_HEADER:
        raise UserError(f"the first line is longer than {MAX_HEADER >> 20} MiB: not a CSV file with a header?",
                        path=str(path), line=1)
    try:
        csv.field_size_limit(MAX_RECORD)
        header = next(csv.reader([first.decode("utf-8-sig").rstrip("\r\n")]))
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (byte 0x{first[e.start]:02x})", path=str(path), line=1) from None
    except csv.Error as e:
        raise UserError(f"malformed CSV header ({e})", path=str(path), line=1) from None
    header = [h.strip().upper() for h in header]
    check_version(version)
    if version == "auto":
        version = "iv" if "NOTE_ID" in header else "iii"
    required = REQUIRED_IV if version == "iv" else REQUIRED
    for c in required:
        if c not in header:
            what = ("MIMIC-IV-Note needs note_id, text (and reads note_type)" if version == "iv"
                    else "MIMIC-III NOTEEVENTS needs ROW_ID, CATEGORY, ISERROR, TEXT")
            raise UserError(f"missing column {c!r} (columns: {', '.join(header)}; {what})", path=str(path), line=1,
                            field=c)
    cols: dict = {c: header.index(c) for c in required}
    cols["_header"] = header
    cols["_version"] = version
    cols["_want"] = tuple(c if c in header else None for c in WANT[version])
    return cols


def _quotes(b: bytes) -> int:
    """How many '"' bytes: replace() runs on memchr, 3x faster than bytes.count for one byte."""
    return len(b) - len(b.replace(b'"', b""))


def _line_at(path: Path, offset: int) -> int:
    """The line number at byte ``offset`` of the (uncompressed) file: only for error messages."""
    f, _ = _open_binary(path)
    n = 0
    with f:
        while offset > 0:
            b = f.read(min(offset, BLOCK))
            if not b:
                break
            n += b.count(b"\n")
            offset -= len(b)
    return n + 1


def csv_tasks(path: Path, advance=None, block: int = BLOCK, by_range: bool | None = None,
              version: str = "auto") -> Iterator[tuple]:
    """Yield blocks of whole records: ("range", path, offset, length, columns) for a plain file
    (the worker reads the bytes itself: nothing big goes through the pipe), ("csv", bytes, columns)
    for a gzipped one.

    A newline ends a record when the number of quotes before it is even (quotes inside fields are
    doubled). The main process only counts quotes; line numbers are counted by the workers."""
    try:
        yield from _csv_tasks(path, advance, block, by_range, version)
    except _gz_errors() as e:
        raise gzip_error(path, e) from None


def _csv_tasks(path: Path, advance, block: int, by_range: bool | None, version: str) -> Iterator[tuple]:
    if by_range is None:
        by_range = not path.name.endswith(".gz")
    f, raw = _open_binary(path)
    with f:
        first = f.readline(MAX_HEADER + 1)
        cols = _parse_header(path, first, version)
        consumed = len(first)          # uncompressed bytes handed out so far (the carry starts here)
        carry, carry_q = b"", 0
        last_pos = 0
        while True:
            data = f.read(block)
            if advance is not None:
                pos = raw.tell()
                advance(pos - last_pos)
                last_pos = pos
            if not data:
                break
            q = _quotes(data)
            pos, suffix, cut = len(data), 0, -1
            while True:
                nl = data.rfind(b"\n", 0, pos)
                if nl < 0:
                    break
                suffix += data.count(b'"', nl, pos)
                if (carry_q + q - suffix) % 2 == 0:
                    cut = nl + 1
                    break
                pos = nl
            if cut < 0:
                carry += data
                carry_q += q
                if len(carry) > MAX_RECORD:
                    raise UserError(f"unterminated quoted field (no record end within {MAX_RECORD >> 20} MB)",
                                    path=str(path), line=_line_at(path, consumed))
                continue
            if by_range:
                n = len(carry) + cut
                yield ("range", str(path), consumed, n, cols)
            else:
                chunk = b"".join((carry, memoryview(data)[:cut])) if carry else data[:cut]
                n = len(chunk)
                yield ("csv", chunk, cols)
            consumed += n
            carry, carry_q = data[cut:], suffix
        if carry.strip():
            if carry_q % 2:
                raise UserError("unterminated quoted field at end of file", path=str(path),
                                line=_line_at(path, consumed))
            yield ("range", str(path), consumed, len(carry), cols) if by_range else ("csv", carry, cols)


# -- worker side: the rows of one block -----------------------------------------------------------
_FDS: dict[str, int] = {}


def read_range(path: str, offset: int, length: int) -> bytes:
    fd = _FDS.get(path)
    if fd is None:
        fd = _FDS[path] = os.open(path, os.O_RDONLY)
    parts, got = [], 0
    while got < length:
        b = os.pread(fd, length - got, offset + got)
        if not b:
            raise OSError(f"{path} shrank while being read")
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def close_files() -> None:
    """Close the files ``read_range`` opened in this process."""
    while _FDS:
        os.close(_FDS.popitem()[1])


def arrow_rows(data: bytes, cols: dict):
    """(id, category, error flag, text) tuples (ROW_ID, CATEGORY, ISERROR, TEXT; or NOTE_ID,
    NOTE_TYPE, "", TEXT) parsed by Arrow's C++ CSV reader (5x faster than the csv module), or None
    when Arrow refuses the block or an id is empty."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        return None
    names = cols.get("_want", WANT["iii"])
    want = [c for c in names if c]
    header = cols["_header"]
    try:
        tbl = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=header, use_threads=False, block_size=len(data) + 1),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 include_columns=want, strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowException):
        return None
    ids = tbl.column(names[0]).to_pylist()
    if any(not i.strip() for i in ids):
        return None

    def col(name):
        return repeat("") if name is None else tbl.column(name).to_pylist()
    return list(zip(ids, col(names[1]), col(names[2]), col(names[3])))


def python_rows(data: bytes, cols: dict, with_lines: bool = False):
    """The same tuples from the strict csv module, or ("error", message, line within the block);
    ``with_lines``: (line within the block, tuple) pairs."""
    start_line = 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return ("error", f"not UTF-8 (byte 0x{data[e.start]:02x})", start_line + data.count(b"\n", 0, e.start))
    ncols = len(cols["_header"])
    names = cols.get("_want", WANT["iii"])
    i_id, i_cat, i_err, i_text = (None if c is None else cols["_header"].index(c) for c in names)
    csv.field_size_limit(MAX_RECORD)   # a long note is no error (csv's default limit is 128 KiB)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    prev = 0
    rows = []
    try:
        for row in reader:
            line = start_line + prev
            prev = reader.line_num
            if not row:
                continue
            if len(row) != ncols:
                return ("error", f"row has {len(row)} fields, header has {ncols}", line)
            if not row[i_id].strip():
                return ("error", f"empty {names[0]}", line)
            r = (row[i_id], "" if i_cat is None else row[i_cat], "" if i_err is None else row[i_err], row[i_text])
            rows.append((line, r) if with_lines else r)
    except csv.Error as e:
        return ("error", f"malformed CSV row ({e})", start_line + prev)
    return rows
