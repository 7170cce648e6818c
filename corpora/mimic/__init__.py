"""MIMIC notes -> completion corpus ``{"id", "text", "source"}``: MIMIC-III NOTEEVENTS and
MIMIC-IV-Note (``discharge``/``radiology``), told apart by their columns (or ``--version``).

Two sources, one pipeline:
- PostgreSQL (psycopg): rows streamed with a server-side (named) cursor, never the whole table;
- the official ``NOTEEVENTS.csv[.gz]``: the main process cuts the file into blocks that end on a
  record boundary (a newline preceded by an even number of quotes: TEXT holds quoted newlines)
  and worker processes parse and clean the blocks. Results come back in order, so the output does
  not depend on the number of workers; duplicates are dropped in the main process (first one wins).
Two notes under one id (ROW_ID / note_id) keep the first; the others are counted in the manifest
(``dropped_duplicate_id``), or refused with ``refuse_duplicate_ids``.
Memory stays flat: at most ``2 x workers`` blocks are in flight.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import json.encoder
import os
import shutil
import tempfile
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate, repeat
from pathlib import Path
from typing import Iterator

from tools.errors import UserError

from .clean import SectionFilter, normalize_whitespace, remove_deid_underscores, remove_placeholders

COLUMNS = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
           "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
REQUIRED = ("ROW_ID", "CATEGORY", "ISERROR", "TEXT")
# MIMIC-IV-Note (discharge.csv.gz, radiology.csv.gz; schema mimiciv_note)
COLUMNS_IV = ["NOTE_ID", "SUBJECT_ID", "HADM_ID", "NOTE_TYPE", "NOTE_SEQ", "CHARTTIME", "STORETIME", "TEXT"]
REQUIRED_IV = ("NOTE_ID", "TEXT")              # NOTE_TYPE is read when present
# (id, category, error flag, text) columns of each version; None: the version has no such column
WANT = {"iii": ("ROW_ID", "CATEGORY", "ISERROR", "TEXT"), "iv": ("NOTE_ID", "NOTE_TYPE", None, "TEXT")}
VERSIONS = ("auto", "iii", "iv")
DEFAULT_TABLES = {"iii": ("mimiciii", "noteevents"), "iv": ("mimiciv_note", "discharge")}
NOTE_TYPES_IV = {"ds": "discharge", "ad": "discharge_addendum", "rr": "radiology", "ar": "radiology_addendum"}
LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
SOURCE = "MIMIC-III v1.4 NOTEEVENTS"
SOURCE_IV = "MIMIC-IV-Note (discharge/radiology)"
BLOCK = 4 << 20            # bytes of CSV per task
MAX_RECORD = 256 << 20     # a "record" longer than this is an unterminated quote
DB_BATCH = 2000            # rows per task from PostgreSQL


@dataclass
class NoteOptions:
    categories: tuple[str, ...] = ()            # empty: every category (compared stripped, casefolded)
    drop_errors: bool = True
    sections: SectionFilter | None = field(default_factory=SectionFilter)
    placeholder: str = ""
    min_chars: int = 200

    def params(self) -> dict:
        return {"categories": sorted(self.categories), "drop_errors": self.drop_errors,
                "sections": None if self.sections is None else {
                    "keep": sorted(self.sections.keep),
                    "headers_sha256": hashlib.sha256(json.dumps(self.sections.headers, sort_keys=True).encode()).hexdigest()},
                "placeholder": self.placeholder, "min_chars": self.min_chars}


_enc = json.encoder.encode_basestring  # C: a JSON string literal, non-ASCII kept
# what encode_basestring escapes, less the newline
_JSON_SPECIAL = '"\\' + "".join(chr(i) for i in range(32) if i != 10)


def json_string(text: str) -> str:
    """``encode_basestring(text)``, 4x faster on clinical text: when nothing but newlines needs an
    escape (checked with memchr-speed ``in``), one ``str.replace`` writes the literal."""
    for c in _JSON_SPECIAL:
        if c in text:
            return _enc(text)
    return '"' + text.replace("\n", "\\n") + '"'


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@lru_cache(maxsize=1024)
def category_source(category: str) -> str:
    return "mimic-iii/noteevents/" + (category.strip().lower().replace(" ", "_").replace("/", "_") or "none")


@lru_cache(maxsize=64)
def note_type_source(note_type: str) -> str:
    t = note_type.strip().lower()
    return "mimic-iv/note/" + NOTE_TYPES_IV.get(t, t.replace(" ", "_").replace("/", "_") or "none")


def _iv_category_wanted(cat: str, wanted) -> bool:
    """A MIMIC-IV note type matches --category by its code (DS, RR...) or its name (discharge...)."""
    c = cat.casefold()
    return c in wanted or NOTE_TYPES_IV.get(c) in wanted


def id_hash(note_id: str) -> int:
    """The id as a 64-bit number for the duplicate-id check (the ids stay in the workers). Python's
    string hash: 20x cheaper than blake2b; the main process and its forked workers share its seed."""
    return hash(note_id)


def clean_note(row_id, category, iserror, text, opts: NoteOptions, stats: Counter,
               version: str = "iii") -> tuple[int, str, int, int] | None:
    """One note row -> (hash of the text, JSON line, length, hash of the id), or None when dropped
    (counted). MIMIC-III and MIMIC-IV rows share the rules; they differ in the de-identification
    marks ([** ... **] / ___), the id and the source name."""
    stats["rows"] += 1
    cat = (category or "").strip()
    iv = version == "iv"
    if opts.categories and not (_iv_category_wanted(cat, opts.categories) if iv else cat.casefold() in opts.categories):
        stats["dropped_category"] += 1
        return None
    if opts.drop_errors and (iserror or "").strip() == "1":
        stats["dropped_iserror"] += 1
        return None
    # placeholders first (so "Mr. [**Known lastname 1**] is" becomes "Mr. is"), then one pass over
    # the lines: sections and whitespace ("\r" is whitespace to str.split)
    if iv:
        text, n = remove_deid_underscores(text or "", opts.placeholder)
    else:
        text, n = remove_placeholders(text or "", opts.placeholder)
    stats["placeholders_removed"] += n
    if opts.sections is not None:
        text, names = opts.sections.extract(text)
        if not names:
            stats["dropped_no_sections"] += 1
            return None
    else:
        text = normalize_whitespace(text)
    if len(text) < opts.min_chars:
        stats["dropped_short"] += 1
        return None
    rid = str(row_id).strip()
    # the same bytes as json.dumps({...}, sort_keys=True, ensure_ascii=False), without the dict
    line = (f'{{"id": {_enc(("mimic-iv-" if iv else "mimic-") + rid)}, '
            f'"source": {_enc(note_type_source(cat) if iv else category_source(cat))}, '
            f'"text": {json_string(text)}}}')
    return text_hash(text), line, len(text), id_hash(rid)


# -- worker side --------------------------------------------------------------------------------
_OPTS: NoteOptions | None = None
_SPOOL: str | None = None       # pool workers leave their output here instead of in the pipe
_SEQ = [0]


def _init_worker(opts: NoteOptions, spool: str | None = None) -> None:
    global _OPTS, _SPOOL
    _OPTS, _SPOOL = opts, spool


def _pack(out: list, stats: Counter, newlines: int = 0):
    """("ok", hashes, byte size of each line, length bucket of each note, one UTF-8 blob of the
    lines (or the file it was spooled to), stats, newlines in the input block, id hashes)."""
    text = "".join(r[1] + "\n" for r in out)
    blob = text.encode("utf-8")
    if text.isascii():
        sizes = [len(r[1]) + 1 for r in out]
    else:
        sizes = [len(r[1].encode("utf-8")) + 1 for r in out]
    buckets = [max(0, r[2].bit_length() - 1) for r in out]
    if _SPOOL is not None and blob:  # a file: the main process copies it in-kernel
        _SEQ[0] += 1
        name = os.path.join(_SPOOL, f"{os.getpid()}-{_SEQ[0]}.part")
        with open(name, "wb") as fh:
            fh.write(blob)
        blob = name
    return ("ok", [r[0] for r in out], sizes, buckets, blob, stats, newlines, [r[3] for r in out])


def _work(task):
    """Process one task; returns _pack(...) or ("error", message, line within the block)."""
    opts = _OPTS
    stats: Counter = Counter()
    out = []
    if task[0] == "rows":
        version = task[2] if len(task) > 2 else "iii"
        for row in task[1]:
            r = clean_note(*row, opts, stats, version)
            if r is not None:
                out.append(r)
        return _pack(out, stats)
    if task[0] == "range":
        _, path, offset, length, cols = task
        data = _read_range(path, offset, length)
    else:
        _, data, cols = task
    stats["bytes"] += len(data)
    rows = _arrow_rows(data, cols)
    if rows is None:  # Arrow refused the block: the strict Python reader names the bad line
        rows = _python_rows(data, cols)
        if rows[0] == "error":
            return rows
    version = cols.get("_version", "iii")
    for row in rows:
        r = clean_note(*row, opts, stats, version)
        if r is not None:
            out.append(r)
    return _pack(out, stats, data.count(b"\n"))


_FDS: dict[str, int] = {}


def _read_range(path: str, offset: int, length: int) -> bytes:
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


def _arrow_rows(data: bytes, cols: dict):
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


def _python_rows(data: bytes, cols: dict, with_lines: bool = False):
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


# -- sources ------------------------------------------------------------------------------------
def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        import gzip
        raw = open(path, "rb")
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    f = open(path, "rb")
    return f, f


MAX_HEADER = 1 << 20


def _gz_errors() -> tuple:
    import gzip
    import zlib
    return (EOFError, gzip.BadGzipFile, zlib.error)


def read_csv_header(path: Path, version: str = "auto") -> dict:
    f, _ = _open_binary(path)
    try:
        with f:
            first = f.readline(MAX_HEADER + 1)
    except _gz_errors() as e:
        from tools.io import gzip_error
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
    if version not in VERSIONS:
        raise UserError(f"unknown MIMIC version {version!r} (one of {', '.join(VERSIONS)})", field="--version")
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
        from tools.io import gzip_error
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


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (keyword or URI form)."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
        d = conninfo_to_dict(dsn)
        d.pop("password", None)
        return make_conninfo(**{k: v for k, v in d.items() if v is not None})
    except Exception:  # noqa: BLE001 - unparsable: hide everything after the user name
        import re
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", re.sub(r"(://[^:/@]*):[^@]*@", r"\1@", dsn))


def _scrub(msg: str, dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict
    try:
        pw = conninfo_to_dict(dsn).get("password")
    except Exception:  # noqa: BLE001
        pw = None
    msg = " ".join(str(msg).split())
    return msg.replace(pw, "***") if pw else msg


def connect(dsn: str, timeout: int = 10):
    import psycopg

    safe = redact_dsn(dsn)
    try:
        return psycopg.connect(dsn, connect_timeout=timeout)
    except (psycopg.OperationalError, psycopg.ProgrammingError) as e:
        reason = _scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, dsn)
        raise UserError(f"cannot connect to PostgreSQL {safe!r}: {reason}", field="--dsn") from None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def pg_ident(name: str) -> str:
    """The name PostgreSQL means by ``name`` as written in SQL: ``"Quoted"`` is taken as written
    (``""`` is one quote), anything else is folded to lower case (ASCII letters only, as the
    server does in UTF-8), so ``NOTEEVENTS`` (how the official DDL scripts write it) is ``noteevents``."""
    s = name.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1].replace('""', '"')
    return s.translate(_ASCII_LOWER)


@dataclass
class DbSource:
    schema: str                  # resolved names (as stored in the catalog)
    table: str
    version: str                 # "iii" or "iv"
    columns: dict                # upper-cased name -> name in the catalog

    @property
    def where(self) -> str:
        return f"{self.schema}.{self.table}"

    def col(self, name: str):
        from psycopg import sql
        return sql.Identifier(self.columns[name])


def _table_columns(cur, schema: str, table: str) -> dict | None:
    cur.execute("""SELECT a.attname FROM pg_catalog.pg_attribute a
                   JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                     AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""", (schema, table))
    rows = cur.fetchall()
    if not rows:
        return None
    cols: dict = {}
    for (name,) in rows:
        cols.setdefault(name.upper(), name)
    return cols


def _case_hint(cur, schema: str, table: str) -> str:
    """When the names exist in another case: how to write them."""
    cur.execute("""SELECT n.nspname, c.relname FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   WHERE lower(n.nspname) = lower(%s) AND lower(c.relname) = lower(%s)
                     AND c.relkind IN ('r', 'p', 'v', 'm', 'f') LIMIT 1""", (schema, table))
    row = cur.fetchone()
    if row is None:
        return ""
    q = [n if n == n.lower() else '"' + n.replace('"', '""') + '"' for n in row]
    return (f"; a table {row[0]}.{row[1]} exists: unquoted names are folded to lower case, so write "
            f"--schema '{q[0]}' --table '{q[1]}'")


def resolve_db_source(dsn: str, schema: str | None, table: str | None, version: str = "auto") -> DbSource:
    """Find the notes table: ``schema.table`` as given (PostgreSQL's rules for unquoted names), or
    by default mimiciii.noteevents, then mimiciv_note.discharge; the version from its columns."""
    import psycopg

    if version not in VERSIONS:
        raise UserError(f"unknown MIMIC version {version!r} (one of {', '.join(VERSIONS)})", field="--version")
    versions = ["iii", "iv"] if version == "auto" else [version]
    cands: list[tuple[str, str]] = []
    for v in versions:
        c = (pg_ident(schema) if schema else DEFAULT_TABLES[v][0], pg_ident(table) if table else DEFAULT_TABLES[v][1])
        if c not in cands:
            cands.append(c)
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            try:
                for sch, tab in cands:
                    cols = _table_columns(cur, sch, tab)
                    if cols is None:
                        continue
                    v = version if version != "auto" else ("iv" if "NOTE_ID" in cols else "iii")
                    need = REQUIRED_IV if v == "iv" else REQUIRED
                    missing = [c for c in need if c not in cols]
                    if missing:
                        kind = "MIMIC-IV-Note" if v == "iv" else "NOTEEVENTS"
                        raise UserError(f"{sch}.{tab} lacks a {kind} column ({missing[0].lower()}; it has "
                                        f"{', '.join(cols.values())})", field="--table")
                    return DbSource(sch, tab, v, cols)
                hint = _case_hint(cur, *cands[0])
                cur.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (cands[0][0],))
                if cur.fetchone() is None and not hint and schema:
                    hint = f"; schema {cands[0][0]} does not exist"
                others = ", ".join(f"{a}.{b}" for a, b in cands[1:])
                raise UserError(f"table {cands[0][0]}.{cands[0][1]} does not exist"
                                + (f" (nor {others})" if others else "") + hint, field="--schema")
            except psycopg.Error as e:
                raise UserError(f"query failed: {_scrub(str(e), dsn)}", field="--dsn") from None
    finally:
        conn.close()


def db_tasks(dsn: str, src: DbSource, opts: NoteOptions, advance=None,
             batch: int = DB_BATCH) -> Iterator[tuple]:
    """Yield ("rows", [...], version) batches streamed through a server-side cursor, in id order
    (MIMIC-IV: subject, note_seq, note_id). The category (note type) and ISERROR filters run in
    SQL (the CATEGORY index helps); the rest in Python."""
    import psycopg
    from psycopg import sql

    where, args = [], []
    iv = src.version == "iv"
    if iv:
        cols = [src.col("NOTE_ID"), src.col("NOTE_TYPE") if "NOTE_TYPE" in src.columns else sql.SQL("''"),
                sql.SQL("''"), src.col("TEXT")]
        if opts.categories and "NOTE_TYPE" in src.columns:
            codes = {c for c in opts.categories} | {k for k, v in NOTE_TYPES_IV.items() if v in opts.categories}
            where.append(sql.SQL("lower(rtrim({})) = ANY(%s)").format(src.col("NOTE_TYPE")))
            args.append(sorted(codes))
        order = [src.col(c) for c in ("SUBJECT_ID", "NOTE_SEQ") if c in src.columns] + [src.col("NOTE_ID")]
    else:
        cols = [src.col(c) for c in ("ROW_ID", "CATEGORY", "ISERROR", "TEXT")]
        if opts.categories:
            where.append(sql.SQL("lower(rtrim({})) = ANY(%s)").format(src.col("CATEGORY")))
            args.append(list(opts.categories))
        if opts.drop_errors:
            where.append(sql.SQL("({0} IS NULL OR rtrim({0}) <> '1')").format(src.col("ISERROR")))
        order = [src.col("ROW_ID")]
    q = sql.SQL("SELECT {} FROM {}.{}{} ORDER BY {}").format(
        sql.SQL(", ").join(cols), sql.Identifier(src.schema), sql.Identifier(src.table),
        sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""), sql.SQL(", ").join(order))
    conn = connect(dsn)
    try:
        with conn.transaction(), conn.cursor(name="medilora_noteevents") as cur:
            cur.itersize = batch
            try:
                cur.execute(q, args)
            except psycopg.errors.UndefinedTable:
                raise UserError(f"table {src.where} does not exist", field="--schema") from None
            except psycopg.errors.InvalidSchemaName:
                raise UserError(f"schema {src.schema} does not exist", field="--schema") from None
            except psycopg.errors.UndefinedColumn as e:
                raise UserError(f"{src.where} lacks a notes column ({_scrub(str(e), dsn)})",
                                field="--schema") from None
            except psycopg.Error as e:
                raise UserError(f"query failed: {_scrub(str(e), dsn)}", field="--dsn") from None
            while True:
                rows = cur.fetchmany(batch)
                if not rows:
                    break
                if advance is not None:
                    advance(len(rows))
                yield ("rows", rows, src.version)
    finally:
        conn.close()


# -- the driver ---------------------------------------------------------------------------------
def build(tasks: Iterator[tuple], out_file: Path, opts: NoteOptions, workers: int, where: str,
          dedup: bool = True, meanwhile=None, refuse_duplicate_ids: bool = False) -> dict:
    """Run ``tasks`` through the cleaner (in ``workers`` processes) and write the JSONL in order.
    ``meanwhile``: a callable run in a thread of the main process once the workers are forked (the
    main process mostly waits on them). A note whose id was already written is dropped and counted
    (``dropped_duplicate_id``), or refused (UserError) with ``refuse_duplicate_ids``."""
    stats: Counter = Counter()
    seen: set[int] = set()
    seen_ids: set[int] = set()
    lengths: Counter = Counter()

    base = [2]  # line number where the next CSV block starts (line 1 is the header)

    def handle(res, f, task=None):
        if res[0] == "error":
            raise UserError(res[1], path=where, line=base[0] + res[2] - 1)
        _, hashes, sizes, buckets, blob, st, newlines, ids = res
        block_base = base[0]
        base[0] += newlines
        stats.update(st)
        dropped: list[int] = []        # positions of duplicates (the first copy wins)
        n_dup = n_dup_id = 0
        if hashes:
            block, id_block = set(hashes), set(ids)
            if ((not dedup or (len(block) == len(hashes) and seen.isdisjoint(block)))
                    and len(id_block) == len(ids) and seen_ids.isdisjoint(id_block)):
                if dedup:              # the usual case: no duplicate, no loop over notes
                    seen.update(block)
                seen_ids.update(id_block)
            else:
                for i, (h, k) in enumerate(zip(hashes, ids)):
                    if dedup and h in seen:
                        dropped.append(i)
                        n_dup += 1
                    elif k in seen_ids:
                        if refuse_duplicate_ids:
                            _refuse_duplicate_id(blob, sizes, i, ids, task, where, block_base)
                        dropped.append(i)
                        n_dup_id += 1
                    else:
                        if dedup:
                            seen.add(h)
                        seen_ids.add(k)
        lengths.update(buckets)
        for i in dropped:
            lengths[buckets[i]] -= 1
        stats["kept"] += len(hashes) - len(dropped)
        if n_dup:
            stats["dropped_duplicate"] += n_dup
        if n_dup_id:
            stats["dropped_duplicate_id"] += n_dup_id
        # the byte ranges of the kept lines, written in order
        offsets = [0, *accumulate(sizes)]
        ranges, pos = [], 0
        for i in dropped:
            if offsets[i] > pos:
                ranges.append((pos, offsets[i] - pos))
            pos = offsets[i + 1]
        if offsets[-1] > pos:
            ranges.append((pos, offsets[-1] - pos))
        if isinstance(blob, str):  # spooled by a worker: copied in-kernel, then removed
            _copy_ranges(blob, f, ranges)
            os.unlink(blob)
        else:
            view = memoryview(blob)
            for off, n in ranges:
                f.write(view[off:off + n])

    with open(out_file, "wb", buffering=0) as f:
        if workers <= 1:
            _init_worker(opts)
            try:
                for t in tasks:
                    handle(_work(t), f, t)
            finally:
                while _FDS:
                    os.close(_FDS.popitem()[1])
        else:
            import multiprocessing as mp
            try:  # import once here: forked workers inherit it instead of importing it each
                import pyarrow.csv  # noqa: F401
            except ImportError:  # pragma: no cover
                pass
            ctx = mp.get_context("fork")
            spool = spool_dir(out_file.parent)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(opts, spool))
            if meanwhile is not None:  # after the fork: no thread is mid-import when workers start
                import threading
                threading.Thread(target=meanwhile, daemon=True).start()
            try:
                pending: deque = deque()
                for t in tasks:
                    pending.append((t, pool.apply_async(_work, (t,))))
                    while len(pending) >= 2 * workers:
                        t0, r = pending.popleft()
                        handle(r.get(), f, t0)
                while pending:
                    t0, r = pending.popleft()
                    handle(r.get(), f, t0)
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
                shutil.rmtree(spool, ignore_errors=True)
    stats = {k: int(v) for k, v in sorted(stats.items())}
    stats["length_log2_histogram"] = {str(1 << k): int(v) for k, v in sorted(lengths.items()) if v}
    return stats


def _refuse_duplicate_id(blob, sizes: list, i: int, ids: list, task, where: str, block_base: int):
    """Raise the UserError for kept note ``i`` of a block, whose id was already written: its id is
    read back from its JSON line; its line in the CSV found by re-reading the block."""
    off = sum(sizes[:i])
    if isinstance(blob, str):
        with open(blob, "rb") as fh:
            fh.seek(off)
            raw = fh.read(sizes[i])
    else:
        raw = bytes(blob[off:off + sizes[i]])
    nid = json.loads(raw)["id"]
    rid = nid.split("-iv-", 1)[1] if nid.startswith("mimic-iv-") else nid.split("-", 1)[1]
    line = None
    if task is not None and task[0] in ("range", "csv"):
        data = _read_range(*task[1:4]) if task[0] == "range" else task[1]
        cols = task[-1]
        rows = _python_rows(data, cols, with_lines=True)
        if rows and rows[0] != "error":
            nth = sum(1 for k in ids[:i] if k == ids[i])   # copies kept earlier in this block
            hits = [ln for ln, r in rows if str(r[0]).strip() == rid]
            if hits:
                line = block_base + hits[min(nth, len(hits) - 1)] - 1
    raise UserError(f"duplicate note id {rid!r}: a note with this id was kept before it (without "
                    "--refuse-duplicate-ids the first is kept and the others are counted)",
                    path=where, line=line, field="id" if line is None else None)


def _copy_ranges(name: str, f, ranges) -> None:
    """Append the byte ``ranges`` [(offset, length), ...] of file ``name`` to the open unbuffered
    file ``f`` with sendfile (in-kernel, across file systems too: the spool may be on tmpfs);
    pread/write where it is refused."""
    with open(name, "rb") as src:
        for off, n in ranges:
            try:
                while n > 0:
                    done = os.sendfile(f.fileno(), src.fileno(), off, n)
                    if done <= 0:
                        break
                    off, n = off + done, n - done
            except OSError:
                pass
            while n > 0:   # no sendfile here (or it stopped short): copy what is left
                b = os.pread(src.fileno(), min(n, 1 << 22), off)
                if not b:
                    raise OSError(f"{name} is shorter than expected")
                f.write(b)
                off, n = off + len(b), n - len(b)


SPOOL_PREFIX = "medilora-mimic-spool-"


def spool_dir(out_dir: Path) -> str:
    """A private (0700) folder for the workers' output blocks: in RAM (/dev/shm) when it has room
    (writing there costs a third of a disk write, and the main process sends the blocks on with
    sendfile), else beside the output. Spools left by a killed run (their process is gone) are
    removed first: credentialed text must not linger."""
    shm = Path("/dev/shm")
    base = out_dir
    try:
        st = os.statvfs(shm)
        if shm.is_dir() and os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 1 << 30:
            base = shm
    except OSError:
        pass
    for stale in base.glob(SPOOL_PREFIX + "*"):
        try:
            pid = int(stale.name[len(SPOOL_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, OSError):       # not ours to judge (another user's process)
            pass
    return tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=base)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def _import_plotting() -> None:
    """Import matplotlib's pyplot (about a second) while the workers clean notes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def plot_lengths(hist: dict, out: Path, title: str) -> None:
    """A bar chart of document lengths (power-of-two buckets of JSON-line length)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(hist)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(range(len(keys)), [hist[k] for k in keys], color="#4477aa")
    ax.set_xticks(range(len(keys)), [f">={int(k):,}" for k in keys], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("documents")
    ax.set_xlabel("characters per document")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)


def db_snapshot(dsn: str, src: DbSource) -> dict:
    """Row count and largest id: what makes a re-run with the same parameters a no-op."""
    import psycopg
    from psycopg import sql

    key = "NOTE_ID" if src.version == "iv" else "ROW_ID"
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(sql.SQL("SELECT count(*), max({}) FROM {}.{}").format(
                    src.col(key), sql.Identifier(src.schema), sql.Identifier(src.table)))
            except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
                raise UserError(f"table {src.where} does not exist", field="--schema") from None
            except psycopg.Error as e:
                raise UserError(f"query failed: {_scrub(str(e), dsn)}", field="--dsn") from None
            n, mx = cur.fetchone()
    finally:
        conn.close()
    if src.version == "iv":
        return {"rows": int(n), "max_note_id": None if mx is None else str(mx).strip()}
    return {"rows": int(n), "max_row_id": None if mx is None else int(mx)}


def build_corpus(out, *, csv_path=None, dsn=None, schema=None, table=None, version: str = "auto",
                 opts: NoteOptions | None = None, workers: int | None = None, dedup: bool = True,
                 refuse_duplicate_ids: bool = False, force: bool = False, plot: bool = True, log=None):
    """The ``corpus.mimic`` stage (MIMIC-III NOTEEVENTS or MIMIC-IV-Note): returns the Artifact.
    ``schema``/``table`` default to mimiciii.noteevents, then mimiciv_note.discharge."""
    from tools.artifact import Lineage, Stage
    from tools.io import require_file
    from tools.progress import progress

    opts = opts or NoteOptions()
    if (csv_path is None) == (dsn is None):
        raise UserError("give exactly one of --csv or --dsn", field="--csv/--dsn")
    if version not in VERSIONS:
        raise UserError(f"unknown MIMIC version {version!r} (one of {', '.join(VERSIONS)})", field="--version")
    workers = workers or default_workers()
    params = {"notes": opts.params(), "dedup": dedup, "refuse_duplicate_ids": refuse_duplicate_ids}
    inputs = []
    if csv_path is not None:
        csv_path = require_file(csv_path, "notes CSV")
        version = read_csv_header(csv_path, version)["_version"]
        params["source"] = {"csv": csv_path.name, "version": version}
        inputs.append(csv_path)
        where = str(csv_path)
    else:
        src = resolve_db_source(dsn, schema, table, version)
        version = src.version
        params["source"] = {"dsn": redact_dsn(dsn), "schema": src.schema, "table": src.table, "version": version,
                            "snapshot": db_snapshot(dsn, src)}
        where = src.where
    lineage = Lineage(credentialed=True, licenses={LICENSE}, sources={SOURCE_IV if version == "iv" else SOURCE})
    with Stage("corpus.mimic", out, params, inputs=inputs, force=force, lineage=lineage, log=log) as st:
        if st.skipped:
            return st.result
        target = st.path("corpus.jsonl")
        if csv_path is not None:
            total = csv_path.stat().st_size
            with progress("MIMIC notes (CSV)", total=total, unit="bytes") as adv:
                stats = build(csv_tasks(csv_path, adv, version=version), target, opts, workers, where, dedup,
                              meanwhile=_import_plotting if plot else None, refuse_duplicate_ids=refuse_duplicate_ids)
        else:
            with progress("MIMIC notes (PostgreSQL)", total=params["source"]["snapshot"]["rows"], unit="rows") as adv:
                stats = build(db_tasks(dsn, src, opts, adv), target, opts, workers, where, dedup,
                              meanwhile=_import_plotting if plot else None, refuse_duplicate_ids=refuse_duplicate_ids)
        if stats.get("kept", 0) == 0:
            raise UserError("no note survived the filters (check --category, --min-chars, --sections)",
                            path=str(csv_path) if csv_path else None, field=None if csv_path else "--dsn")
        if plot:
            plot_lengths(stats["length_log2_histogram"], st.path("lengths.png"),
                         f"MIMIC{'-IV' if version == 'iv' else ''} corpus: {stats['kept']:,} notes")
        st.extra["stats"] = stats
        st.extra["version"] = version
        st.extra["workers"] = workers
    return st.result
