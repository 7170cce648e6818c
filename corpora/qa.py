"""Generic question/answer CSV or JSONL -> ChatML SFT rows or completion rows."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tools.artifact import Stage
from tools.errors import UserError
from tools.io import read_csv_numbered, read_jsonl_numbered, require_file, write_jsonl


def parse_filters(filters) -> list[tuple[str, str]]:
    out = []
    for f in filters or ():
        if "=" not in f:
            raise UserError(f"--filter wants COLUMN=VALUE, got {f!r}", field="--filter")
        k, v = f.split("=", 1)
        if not k.strip():
            raise UserError(f"--filter wants COLUMN=VALUE, got {f!r}", field="--filter")
        out.append((k.strip(), v.strip()))
    return out


def _text(v) -> str:
    """A cell as text: a JSON null is empty (never "None")."""
    return "" if v is None else str(v)


def _rows(src: Path, needed: tuple[str, ...]):
    """(line-or-row number, dict) from a CSV (header row) or JSONL file; missing columns name the file."""
    name = src.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        yield from read_csv_numbered(src, required=needed)
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
        yield from read_jsonl_numbered(src, required=needed)
    else:
        raise UserError("expected a .csv or .jsonl file", path=str(src))


@dataclass(frozen=True)
class QASpec:
    """Which columns hold the question, the answer (and an id), which rows to keep, and the row format."""

    question_col: str
    answer_col: str
    filters: tuple = ()
    fmt: str = "chatml"
    system: str | None = None
    id_col: str | None = None
    license: str = "unknown (user-supplied Q&A)"


def build_qa(src, out, spec: QASpec | None = None, *, force: bool = False, log=None, **fields):
    """Artifact ``out`` (stage ``dataset.qa``): ``train.jsonl`` of ChatML (or completion) rows, one a kept row
    of ``src``; ``build_qa(src, out, spec)`` or ``build_qa(src, out, **QASpec fields)``."""
    spec = spec or QASpec(**fields)
    question_col, answer_col, fmt, system, id_col = spec.question_col, spec.answer_col, spec.fmt, spec.system, spec.id_col
    filters, license = spec.filters, spec.license
    src = require_file(src, "Q&A file")
    if fmt not in ("chatml", "completion"):
        raise UserError(f"--format must be chatml or completion, got {fmt!r}", field="--format")
    flt = parse_filters(filters)
    needed = tuple(dict.fromkeys([question_col, answer_col, *(k for k, _ in flt), *([id_col] if id_col else [])]))
    params = {"question_col": question_col, "answer_col": answer_col, "filters": [f"{k}={v}" for k, v in flt],
              "format": fmt, "system": system, "id_col": id_col, "license": license}
    with Stage("dataset.qa", out, params, inputs=[src], force=force, log=log) as st:
        if st.skipped:
            return st.result
        rows, stats, ids = [], Counter(), set()
        for n, r in _rows(src, needed):
            stats["read"] += 1
            if any(_text(r.get(k)).strip() != v for k, v in flt):
                stats["filtered_out"] += 1
                continue
            q, a = _text(r[question_col]).strip(), _text(r[answer_col]).strip()
            if not q or not a:
                stats["dropped_empty"] += 1
                continue
            if id_col and not _text(r[id_col]).strip():
                raise UserError(f"empty id in column {id_col!r}", path=str(src), line=n, field=id_col)
            rid = f"qa-{_text(r[id_col]).strip()}" if id_col else f"qa-{n}"
            if rid in ids:
                raise UserError(f"duplicate id {rid!r}", path=str(src), line=n, field=id_col or "id")
            ids.add(rid)
            meta = {k: v for k, v in r.items() if k not in (question_col, answer_col)}
            if fmt == "chatml":
                msgs = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": q}, {"role": "assistant", "content": a}]
                rows.append({"id": rid, "messages": msgs, "meta": meta})
            else:
                rows.append({"id": rid, "text": f"Question: {q}\nAnswer: {a}", "source": f"qa/{src.name}",
                             "meta": meta})
        if not rows:
            raise UserError(f"no row left after the filters ({stats['read']} read)", path=str(src))
        write_jsonl(st.path("train.jsonl"), rows)
        st.lineage.sources.add(f"qa: {src.name}")
        st.lineage.licenses.add(license)
        st.extra.update({"items": len(rows), "stats": dict(sorted(stats.items()))})
    return st.result
