"""MIMIC-III NOTEEVENTS -> completion corpus ``{"id", "text", "source"}``.

Two sources, one pipeline:
- PostgreSQL (psycopg): rows streamed with a server-side (named) cursor, never the whole table;
- the official ``NOTEEVENTS.csv[.gz]``: the main process cuts the file into blocks that end on a
  record boundary (a newline preceded by an even number of quotes: TEXT holds quoted newlines)
  and worker processes parse and clean the blocks. Results come back in order, so the output does
  not depend on the number of workers; duplicates are dropped in the main process (first one wins).
Memory stays flat: at most ``2 x workers`` blocks are in flight.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tools.errors import UserError

from .clean import SectionFilter, normalize_whitespace, remove_placeholders

COLUMNS = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
           "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
REQUIRED = ("ROW_ID", "CATEGORY", "ISERROR", "TEXT")
LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
SOURCE = "MIMIC-III v1.4 NOTEEVENTS"
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


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def category_source(category: str) -> str:
    return "mimic-iii/noteevents/" + (category.strip().lower().replace(" ", "_").replace("/", "_") or "none")


def clean_note(row_id, category, iserror, text, opts: NoteOptions, stats: Counter) -> tuple[int, str, int] | None:
    """One NOTEEVENTS row -> (hash of the text, JSON line, length), or None when dropped (counted)."""
    stats["rows"] += 1
    cat = (category or "").strip()
    if opts.categories and cat.casefold() not in opts.categories:
        stats["dropped_category"] += 1
        return None
    if opts.drop_errors and (iserror or "").strip() == "1":
        stats["dropped_iserror"] += 1
        return None
    text = (text or "").replace("\r\n", "\n")
    if opts.sections is not None:
        text, names = opts.sections.extract(text)
        if not names:
            stats["dropped_no_sections"] += 1
            return None
    text, n = remove_placeholders(text, opts.placeholder)
    stats["placeholders_removed"] += n
    text = normalize_whitespace(text)
    if len(text) < opts.min_chars:
        stats["dropped_short"] += 1
        return None
    line = json.dumps({"id": f"mimic-{str(row_id).strip()}", "source": category_source(cat), "text": text},
                      ensure_ascii=False, sort_keys=True)
    return text_hash(text), line, len(text)


# -- worker side --------------------------------------------------------------------------------
_OPTS: NoteOptions | None = None


def _init_worker(opts: NoteOptions) -> None:
    global _OPTS
    _OPTS = opts


def _work(task):
    """Process one task; returns ("ok", [(hash, line)], stats) or ("error", message, line)."""
    opts = _OPTS
    stats: Counter = Counter()
    out = []
    if task[0] == "rows":
        for row in task[1]:
            r = clean_note(*row, opts, stats)
            if r is not None:
                out.append(r)
        return ("ok", out, stats)
    _, data, start_line, cols = task
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return ("error", f"not UTF-8 (byte 0x{data[e.start]:02x})", start_line + data.count(b"\n", 0, e.start))
    stats["bytes"] += len(data)
    ncols = len(cols["_header"])
    i_id, i_cat, i_err, i_text = cols["ROW_ID"], cols["CATEGORY"], cols["ISERROR"], cols["TEXT"]
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    prev = 0
    try:
        for row in reader:
            line = start_line + prev
            prev = reader.line_num
            if not row:
                continue
            if len(row) != ncols:
                return ("error", f"row has {len(row)} fields, header has {ncols}", line)
            if not row[i_id].strip():
                return ("error", "empty ROW_ID", line)
            r = clean_note(row[i_id], row[i_cat], row[i_err], row[i_text], opts, stats)
            if r is not None:
                out.append(r)
    except csv.Error as e:
        return ("error", f"malformed CSV row ({e})", start_line + prev)
    return ("ok", out, stats)


# -- sources ------------------------------------------------------------------------------------
def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        import gzip
        raw = open(path, "rb")
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    f = open(path, "rb")
    return f, f


def read_csv_header(path: Path) -> dict:
    f, _ = _open_binary(path)
    with f:
        first = f.readline()
    return _parse_header(path, first)


def _parse_header(path: Path, first: bytes) -> dict:
    if not first.strip():
        raise UserError("CSV file is empty (no header)", path=str(path), line=1)
    try:
        header = next(csv.reader([first.decode("utf-8-sig").rstrip("\r\n")]))
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (byte 0x{first[e.start]:02x})", path=str(path), line=1) from None
    header = [h.strip().upper() for h in header]
    for c in REQUIRED:
        if c not in header:
            raise UserError(f"missing column {c!r} (columns: {', '.join(header)})", path=str(path), line=1, field=c)
    cols = {c: header.index(c) for c in REQUIRED}
    cols["_header"] = header
    return cols


def _record_end(buf: bytes) -> int:
    """Index just after the last newline of ``buf`` that ends a CSV record (even quote count before
    it), or -1 when there is none."""
    total = buf.count(b'"')
    pos = len(buf)
    suffix = 0
    while True:
        nl = buf.rfind(b"\n", 0, pos)
        if nl < 0:
            return -1
        suffix += buf.count(b'"', nl, pos)
        if (total - suffix) % 2 == 0:
            return nl + 1
        pos = nl


def csv_tasks(path: Path, advance=None, block: int = BLOCK) -> Iterator[tuple]:
    """Yield ("csv", bytes, first_line, columns) blocks, each a run of whole records."""
    f, raw = _open_binary(path)
    with f:
        cols = _parse_header(path, f.readline())
        line = 2
        carry = b""
        last_pos = 0
        while True:
            data = f.read(block)
            if advance is not None:
                pos = raw.tell()
                advance(pos - last_pos)
                last_pos = pos
            if not data:
                break
            buf = carry + data if carry else data
            cut = _record_end(buf)
            if cut < 0:
                if len(buf) > MAX_RECORD:
                    raise UserError(f"unterminated quoted field (no record end within {MAX_RECORD >> 20} MB)",
                                    path=str(path), line=line)
                carry = buf
                continue
            chunk, carry = buf[:cut], buf[cut:]
            yield ("csv", chunk, line, cols)
            line += chunk.count(b"\n")
        if carry.strip():
            if carry.count(b'"') % 2:
                raise UserError("unterminated quoted field at end of file", path=str(path), line=line)
            yield ("csv", carry, line, cols)


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


def db_tasks(dsn: str, schema: str, table: str, opts: NoteOptions, advance=None,
             batch: int = DB_BATCH) -> Iterator[tuple]:
    """Yield ("rows", [...]) batches streamed through a server-side cursor, in ROW_ID order.
    Category and ISERROR filters run in SQL (the CATEGORY index helps); the rest in Python."""
    import psycopg
    from psycopg import sql

    where, args = [], []
    if opts.categories:
        where.append(sql.SQL("lower(rtrim(category)) = ANY(%s)"))
        args.append(list(opts.categories))
    if opts.drop_errors:
        where.append(sql.SQL("(iserror IS NULL OR rtrim(iserror) <> '1')"))
    q = sql.SQL("SELECT row_id, category, iserror, text FROM {}.{}{} ORDER BY row_id").format(
        sql.Identifier(schema), sql.Identifier(table),
        sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
    conn = connect(dsn)
    try:
        with conn.transaction(), conn.cursor(name="medilora_noteevents") as cur:
            cur.itersize = batch
            try:
                cur.execute(q, args)
            except psycopg.errors.UndefinedTable:
                raise UserError(f"table {schema}.{table} does not exist", field="--schema") from None
            except psycopg.errors.InvalidSchemaName:
                raise UserError(f"schema {schema} does not exist", field="--schema") from None
            except psycopg.errors.UndefinedColumn as e:
                raise UserError(f"{schema}.{table} lacks a NOTEEVENTS column ({_scrub(str(e), dsn)})",
                                field="--schema") from None
            except psycopg.Error as e:
                raise UserError(f"query failed: {_scrub(str(e), dsn)}", field="--dsn") from None
            while True:
                rows = cur.fetchmany(batch)
                if not rows:
                    break
                if advance is not None:
                    advance(len(rows))
                yield ("rows", rows)
    finally:
        conn.close()


# -- the driver ---------------------------------------------------------------------------------
def build(tasks: Iterator[tuple], out_file: Path, opts: NoteOptions, workers: int, where: str,
          dedup: bool = True) -> dict:
    """Run ``tasks`` through the cleaner (in ``workers`` processes) and write the JSONL in order."""
    stats: Counter = Counter()
    seen: set[int] = set()
    lengths: Counter = Counter()

    def handle(res, f):
        if res[0] == "error":
            raise UserError(res[1], path=where, line=res[2])
        _, kept, st = res
        stats.update(st)
        for h, line, n in kept:
            if dedup:
                if h in seen:
                    stats["dropped_duplicate"] += 1
                    continue
                seen.add(h)
            f.write(line)
            f.write("\n")
            stats["kept"] += 1
            lengths[max(0, n.bit_length() - 1)] += 1

    with open(out_file, "w", encoding="utf-8", newline="\n") as f:
        if workers <= 1:
            _init_worker(opts)
            for t in tasks:
                handle(_work(t), f)
        else:
            import multiprocessing as mp
            ctx = mp.get_context("fork")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(opts,))
            try:
                pending: deque = deque()
                for t in tasks:
                    pending.append(pool.apply_async(_work, (t,)))
                    while len(pending) >= 2 * workers:
                        handle(pending.popleft().get(), f)
                while pending:
                    handle(pending.popleft().get(), f)
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
    stats = {k: int(v) for k, v in sorted(stats.items())}
    stats["length_log2_histogram"] = {str(1 << k): int(v) for k, v in sorted(lengths.items())}
    return stats


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


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


def db_snapshot(dsn: str, schema: str, table: str) -> dict:
    """Row count and largest ROW_ID: what makes a re-run with the same parameters a no-op."""
    import psycopg
    from psycopg import sql

    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(sql.SQL("SELECT count(*), max(row_id) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)))
            except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
                raise UserError(f"table {schema}.{table} does not exist", field="--schema") from None
            except psycopg.Error as e:
                raise UserError(f"query failed: {_scrub(str(e), dsn)}", field="--dsn") from None
            n, mx = cur.fetchone()
    finally:
        conn.close()
    return {"rows": int(n), "max_row_id": None if mx is None else int(mx)}


def build_corpus(out, *, csv_path=None, dsn=None, schema="mimiciii", table="noteevents",
                 opts: NoteOptions | None = None, workers: int | None = None, dedup: bool = True,
                 force: bool = False, plot: bool = True, log=None):
    """The ``corpus.mimic`` stage: returns the Artifact."""
    from tools.artifact import Lineage, Stage
    from tools.io import require_file
    from tools.progress import progress

    opts = opts or NoteOptions()
    if (csv_path is None) == (dsn is None):
        raise UserError("give exactly one of --csv or --dsn", field="--csv/--dsn")
    workers = workers or default_workers()
    params = {"notes": opts.params(), "dedup": dedup}
    inputs = []
    if csv_path is not None:
        csv_path = require_file(csv_path, "NOTEEVENTS CSV")
        params["source"] = {"csv": csv_path.name}
        inputs.append(csv_path)
    else:
        params["source"] = {"dsn": redact_dsn(dsn), "schema": schema, "table": table,
                            "snapshot": db_snapshot(dsn, schema, table)}
    lineage = Lineage(credentialed=True, licenses={LICENSE}, sources={SOURCE})
    with Stage("corpus.mimic", out, params, inputs=inputs, force=force, lineage=lineage, log=log) as st:
        if st.skipped:
            return st.result
        target = st.path("corpus.jsonl")
        if csv_path is not None:
            total = csv_path.stat().st_size
            with progress("MIMIC notes (CSV)", total=total, unit="bytes") as adv:
                stats = build(csv_tasks(csv_path, adv), target, opts, workers, str(csv_path), dedup)
        else:
            with progress("MIMIC notes (PostgreSQL)", total=params["source"]["snapshot"]["rows"], unit="rows") as adv:
                stats = build(db_tasks(dsn, schema, table, opts, adv), target, opts, workers,
                              f"{schema}.{table}", dedup)
        if stats.get("kept", 0) == 0:
            raise UserError("no note survived the filters (check --category, --min-chars, --sections)",
                            path=str(csv_path) if csv_path else None, field=None if csv_path else "--dsn")
        if plot:
            plot_lengths(stats["length_log2_histogram"], st.path("lengths.png"),
                         f"MIMIC corpus: {stats['kept']:,} notes")
        st.extra["stats"] = stats
        st.extra["workers"] = workers
    return st.result
