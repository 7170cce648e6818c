"""MIMIC notes -> completion corpus ``{"id", "text", "source"}`` (the ``corpus.mimic`` stage): MIMIC-III
NOTEEVENTS and MIMIC-IV-Note (``discharge``/``radiology``), told apart by their columns (or ``--version``),
read from the CSV(.gz) or from PostgreSQL.

One module a concern, dependencies one way (notes <- csv_source, pg_source <- pool <- this file):
``notes`` cleans one row, ``csv_source`` and ``pg_source`` cut a source into tasks, ``pool`` runs the
tasks in worker processes and writes the JSONL in order (the output does not depend on the number of
workers), ``report`` plots the note lengths. Duplicate texts and a second note under one id (ROW_ID /
note_id) are dropped, the first one kept, and counted in the manifest (``dropped_duplicate``,
``dropped_duplicate_id``); ``refuse_duplicate_ids`` refuses a second id instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from corpora.clean import load_section_filter
from tools.artifact import Lineage, Stage
from tools.errors import UserError
from tools.io import require_file
from tools.progress import progress

from ..canaries import CanarySpec, plant_in_stage
from .csv_source import BLOCK, MAX_RECORD, arrow_rows, csv_tasks, python_rows, read_csv_header
from .notes import LICENSE, SOURCE, SOURCE_IV, VERSIONS, NoteOptions, check_version, clean_note, json_string
from .pg_source import DbSource, connect, db_snapshot, db_tasks, pg_ident, redact_dsn, resolve_db_source
from .pool import SPOOL_PREFIX, build, default_workers, spool_dir
from .report import plot_lengths, preload_pyplot

_arrow_rows, _python_rows = arrow_rows, python_rows    # the names tests import

__all__ = ["BLOCK", "LICENSE", "MAX_RECORD", "SOURCE", "SOURCE_IV", "SPOOL_PREFIX", "VERSIONS", "DbSource",
           "NoteOptions", "_arrow_rows", "_python_rows", "build", "build_corpus", "clean_note", "connect", "csv_tasks",
           "db_snapshot", "db_tasks", "default_workers", "json_string", "pg_ident", "plot_lengths", "read_csv_header",
           "redact_dsn", "resolve_db_source", "spool_dir"]


@dataclass(frozen=True)
class MimicSpec:
    """Where the notes come from (a CSV or a PostgreSQL DSN, schema, table, MIMIC version), which to keep
    (``opts``, dedup, a repeated id refused or counted), how many workers, whether to plot lengths, and the
    canaries to plant for `tools audit` (``--canaries``, corpora/canaries.py)."""

    csv_path: str | os.PathLike | None = None
    dsn: str | None = None
    schema: str | None = None
    table: str | None = None
    version: str = "auto"
    opts: NoteOptions | None = None
    workers: int | None = None
    dedup: bool = True
    refuse_duplicate_ids: bool = False
    plot: bool = True
    canaries: CanarySpec | None = None


def build_corpus(out, spec: MimicSpec | None = None, *, force: bool = False, log=None, **fields):
    """The ``corpus.mimic`` stage (MIMIC-III NOTEEVENTS or MIMIC-IV-Note): returns the Artifact;
    ``build_corpus(out, spec)`` or ``build_corpus(out, **MimicSpec fields)``.
    ``schema``/``table`` default to mimiciii.noteevents, then mimiciv_note.discharge."""
    spec = spec or MimicSpec(**fields)
    csv_path, dsn, version, workers, dedup, plot = (spec.csv_path, spec.dsn, spec.version, spec.workers, spec.dedup,
                                                    spec.plot)
    schema, table, refuse_duplicate_ids = spec.schema, spec.table, spec.refuse_duplicate_ids
    opts = spec.opts or NoteOptions()
    if (csv_path is None) == (dsn is None):
        raise UserError("give exactly one of --csv or --dsn", field="--csv/--dsn")
    check_version(version)
    workers = workers or default_workers()
    params = {"notes": opts.params(), "dedup": dedup, "refuse_duplicate_ids": refuse_duplicate_ids}
    if spec.canaries:
        params["canaries"] = spec.canaries.params()
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
                              meanwhile=preload_pyplot if plot else None, refuse_duplicate_ids=refuse_duplicate_ids)
        else:
            with progress("MIMIC notes (PostgreSQL)", total=params["source"]["snapshot"]["rows"], unit="rows") as adv:
                stats = build(db_tasks(dsn, src, opts, adv), target, opts, workers, where, dedup,
                              meanwhile=preload_pyplot if plot else None, refuse_duplicate_ids=refuse_duplicate_ids)
        if stats.get("kept", 0) == 0:
            raise UserError("no note survived the filters (check --category, --min-chars, --sections)",
                            path=str(csv_path) if csv_path else None, field=None if csv_path else "--dsn")
        if plot:
            plot_lengths(stats["length_log2_histogram"], st.path("lengths.png"),
                         f"MIMIC{'-IV' if version == 'iv' else ''} corpus: {stats['kept']:,} notes")
        st.extra["stats"] = stats
        st.extra["version"] = version
        st.extra["workers"] = workers
        plant_in_stage(st, spec.canaries, where)
    return st.result


def note_options(*, categories=(), keep_errors: bool = False, sections_file=None, all_sections: bool = False,
                 placeholder: str = "", min_chars: int = 200) -> NoteOptions:
    """The cleaning options of `tools build-corpus mimic` (categories compared stripped and casefolded)."""
    if sections_file and all_sections:
        raise UserError("--sections-file and --all-sections exclude each other", field="--all-sections")
    return NoteOptions(categories=tuple(sorted({c.strip().casefold() for c in categories})),
                       drop_errors=not keep_errors, sections=None if all_sections else load_section_filter(sections_file),
                       placeholder=placeholder, min_chars=min_chars)
