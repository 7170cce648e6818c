"""The notes table in PostgreSQL (psycopg): the DSN without its password, connecting, finding the
table and its version (``resolve_db_source``), its snapshot, and its rows streamed in batches through
a server-side cursor (``db_tasks``), never the whole table."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from tools.errors import UserError

from .notes import DEFAULT_TABLES, NOTE_TYPES_IV, REQUIRED, REQUIRED_IV, NoteOptions, check_version

DB_BATCH = 2000            # rows per task from PostgreSQL


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (keyword or URI form)."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
        d = conninfo_to_dict(dsn)
        d.pop("password", None)
        return make_conninfo(**{k: v for k, v in d.items() if v is not None})
    except Exception:  # noqa: BLE001 - unparsable: hide everything after the user name
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

    check_version(version)
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
