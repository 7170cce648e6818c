"""PubMedQA and MedQA as their projects (and the Hugging Face Hub) publish them, read into one
canonical form each, for ``build-dataset pubmedqa|medqa`` and ``bench --data``.

Files: ``.json`` (one document: a mapping ``key -> record`` such as PubMedQA's ``ori_pqal.json``
and ``test_set.json``, or a list of records; a ``.json`` that holds JSON Lines, as ``datasets``'
``to_json`` writes, is read as such), ``.jsonl`` / ``.jsonl.gz``, ``.parquet`` (Hub exports); any
other name is read as JSON Lines.

Records:
- PubMedQA, ours and ``ori_pqal.json``: ``QUESTION``, ``CONTEXTS``, ``final_decision``,
  ``LONG_ANSWER``, ``YEAR``, ``MESHES`` (the PMID is the key, or ``id``);
- PubMedQA ``pqa_labeled`` (Hub): ``pubid``, ``question``, ``context: {contexts, meshes, ...}``,
  ``long_answer``, ``final_decision``;
- MedQA's own JSONL: ``question``, ``options: {A: ...}``, ``answer_idx`` (or ``answer``), ``meta_info``;
- MedQA, BigBio source schema: the same with ``options: [{key, value}, ...]``;
- MedQA, BigBio QA schema: ``id``, ``question``, ``choices: [...]``, ``answer: [text]``.

Upstream nulls stay empty (never the string "None"); every problem names file, line (or row, or
the record's key) and field.
"""
from __future__ import annotations

import json
from pathlib import Path

from tools.errors import UserError
from tools.io import open_binary, read_json, read_jsonl_numbered, require_file


def _where(key, line) -> dict:
    return {"line": line} if line is not None else {}


def _field(key, line, name: str) -> str:
    return name if line is not None or key is None else f"{key}.{name}"


def read_records(path, what: str = "data file") -> list[tuple[str | None, object, int | None]]:
    """(key, record, line) of every record: ``key`` for a mapping document, ``line`` the line of a
    JSON Lines file (or the row of a Parquet file)."""
    p = require_file(path, what)
    name = p.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # noqa: BLE001 - any Arrow failure is an unreadable input
            raise UserError(f"unreadable Parquet file ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                            path=str(p)) from None
        return [(None, r, i) for i, r in enumerate(rows, 1)]
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return [(None, obj, n) for n, obj in read_jsonl_numbered(p)]
    if name.endswith((".json", ".json.gz")):
        if _looks_like_lines(p):
            return [(None, obj, n) for n, obj in read_jsonl_numbered(p)]
        doc = read_json(p, what)
        if isinstance(doc, list):
            return [(str(i), r, None) for i, r in enumerate(doc)]
        if isinstance(doc, dict):
            if doc and all(isinstance(v, dict) for v in doc.values()) and not _is_record(doc):
                return [(str(k), v, None) for k, v in doc.items()]
            return [(None, doc, 1)]
        raise UserError("expected a JSON object or list of records", path=str(p))
    return [(None, obj, n) for n, obj in read_jsonl_numbered(p)]   # any other name: JSON Lines


def _is_record(d: dict) -> bool:
    return any(k in d for k in ("QUESTION", "question", "options", "choices"))


def _looks_like_lines(p: Path) -> bool:
    """A .json file whose first line is a whole JSON object and that has more lines: JSON Lines."""
    try:
        with open_binary(p) as f:
            first = f.readline(1 << 24)
            rest = f.read(4096)
    except Exception:  # noqa: BLE001 - read_json reports it
        return False
    if not rest.strip():
        return False
    try:
        return isinstance(json.loads(first.decode("utf-8-sig")), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _text(v) -> str:
    """An upstream scalar as text: null is empty, never "None"."""
    return "" if v is None else str(v)


# -- PubMedQA -----------------------------------------------------------------------------------
def pubmedqa_shape(obj) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "QUESTION" in obj:
        return "ori"
    if "question" in obj and isinstance(obj.get("context"), dict) and "final_decision" in obj:
        return "pqa_labeled"
    return None


def pubmedqa_record(obj, key, line, path) -> tuple[str, dict]:
    """(pmid, {QUESTION, CONTEXTS, final_decision, LONG_ANSWER, YEAR, MESHES}) of one upstream record."""
    shape = pubmedqa_shape(obj)
    if shape == "ori":
        pmid = obj["id"] if "id" in obj else key
        rec = {k: obj.get(k) for k in ("QUESTION", "CONTEXTS", "final_decision", "LONG_ANSWER")}
        rec["YEAR"], rec["MESHES"] = obj.get("YEAR"), obj.get("MESHES")
    elif shape == "pqa_labeled":
        pmid = obj.get("pubid", key)
        ctx = obj["context"]
        rec = {"QUESTION": obj.get("question"), "CONTEXTS": ctx.get("contexts"),
               "final_decision": obj.get("final_decision"), "LONG_ANSWER": obj.get("long_answer"),
               "YEAR": obj.get("year"), "MESHES": ctx.get("meshes")}
    else:
        keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise UserError("not a PubMedQA record (expected QUESTION, CONTEXTS, final_decision as in ori_pqal.json, "
                        f"or pubid, question, context, final_decision as in pqa_labeled; got {keys})",
                        path=str(path), field=_field(key, line, "record"), **_where(key, line))
    if pmid is None or not str(pmid).strip():
        raise UserError("missing PMID (id / pubid)", path=str(path), field=_field(key, line, "id"), **_where(key, line))
    pmid = str(pmid).strip()
    meshes = rec["MESHES"]
    if meshes is None:
        meshes = []
    if not isinstance(meshes, list):
        raise UserError("MESHES must be a list", path=str(path), field=_field(pmid if line is None else None, line,
                                                                                "MESHES"), **_where(key, line))
    rec["MESHES"] = [_text(m) for m in meshes]
    rec["YEAR"] = _text(rec["YEAR"])
    return pmid, rec


# -- MedQA --------------------------------------------------------------------------------------
def medqa_shape(obj) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "choices" in obj and "answer" in obj and "options" not in obj:
        return "bigbio_qa"
    if isinstance(obj.get("options"), list):
        return "bigbio_source"
    if isinstance(obj.get("options"), dict) and ("answer_idx" in obj or "answer" in obj):
        return "medqa"
    return None


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def medqa_record(obj, key, line, path) -> tuple[str | None, dict]:
    """(id or None, {question, options {A: text}, answer_idx or None, answer, meta_info}) of one
    upstream MedQA record (its own JSONL, BigBio source or BigBio QA schema)."""
    where = _where(key, line)
    shape = medqa_shape(obj)
    if shape is None:
        keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise UserError("not a MedQA record (expected question, options, answer_idx as in MedQA's JSONL or BigBio's "
                        f"source schema, or question, choices, answer as in BigBio's QA schema; got {keys})",
                        path=str(path), field=_field(key, line, "record"), **where)
    rid = obj.get("id", key)
    rid = None if rid is None or not str(rid).strip() else str(rid).strip()
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise UserError("empty question", path=str(path), field=_field(key, line, "question"), **where)
    if shape == "bigbio_qa":
        choices, answer = obj.get("choices"), obj.get("answer")
        if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
            raise UserError("choices must be a list of 2 to 26 texts", path=str(path), field=_field(key, line, "choices"),
                            **where)
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        opts = dict(zip(_letters(len(choices)), choices))
        hits = [k for k, v in opts.items() if isinstance(answer, str) and v.strip() == answer.strip()]
        if len(hits) != 1:
            raise UserError(f"answer {answer!r} is not exactly one of the choices", path=str(path),
                            field=_field(key, line, "answer"), **where)
        return rid, {"question": q, "options": opts, "answer_idx": hits[0], "answer": answer, "meta_info": ""}
    opts = obj["options"]
    if shape == "bigbio_source":
        d = {}
        for o in opts:
            if not isinstance(o, dict) or not isinstance(o.get("key"), str) or not isinstance(o.get("value"), str):
                raise UserError("options must be a list of {key, value} texts", path=str(path),
                                field=_field(key, line, "options"), **where)
            if o["key"] in d:
                raise UserError(f"option {o['key']!r} given twice", path=str(path), field=_field(key, line, "options"),
                                **where)
            d[o["key"].strip()] = o["value"]
        opts = d
    ans_idx = obj.get("answer_idx")
    return rid, {"question": q, "options": opts, "answer_idx": None if ans_idx is None else str(ans_idx).strip(),
                 "answer": obj.get("answer"), "meta_info": _text(obj.get("meta_info"))}
