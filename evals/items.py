"""Benchmark items: load PubMedQA / MedQA (raw or normalized) and build the MediLoRA prompts.

Normalized item (docs/ARCHITECTURE.md): ``{"id", "question", "context", "options", "answer"}`` with
``options`` a mapping label -> text (PubMedQA: yes/no/maybe) and ``answer`` one of its labels.
Accepted inputs (JSONL line by line; also whole ``.json`` documents and Hub ``.parquet`` exports,
read by ``corpora.upstream``):

- PubMedQA as shipped (``evals/data/pubmedqa``): ``id``, ``QUESTION``, ``CONTEXTS``, ``final_decision``;
  PubMedQA's own ``ori_pqal.json`` / ``test_set.json`` ({pmid: {QUESTION, ...}}); the Hub's
  ``pqa_labeled`` export (``pubid``, ``question``, ``context.contexts``, ``final_decision``);
- MedQA as shipped (``evals/data/medqa``) and MedQA's own JSONL: ``question``, ``options`` {A..},
  ``answer_idx`` (the id is the line number, as the data has none); BigBio's source schema (``options``
  as a list of {key, value}) and QA schema (``choices``, ``answer: [text]``);
- normalized items (any task): ``id``, ``question``, ``options``, ``answer`` (``context`` optional).

Every problem names the file, the line and the field (``UserError``, exit 2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from corpora.sft import medqa_user, pubmedqa_user  # one formatter: train as you test
from corpora.sft import system_prompt as _system_prompt
from corpora.upstream import medqa_record, medqa_shape, pubmedqa_record, pubmedqa_shape, read_records
from tools.errors import UserError
from tools.io import read_jsonl_numbered, require_file
from tools.paths import bundled_data

TASKS = ("pubmedqa", "medqa")
SPLITS = ("test", "dev")
PUBMEDQA_LABELS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    context: str
    options: dict  # label -> text, in display order
    answer: str

    def to_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "context": self.context,
                "options": dict(self.options), "answer": self.answer}


def default_data(task: str, split: str) -> Path:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r} (one of {', '.join(TASKS)})", field="task")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (one of {', '.join(SPLITS)})", field="--split")
    return bundled_data() / task / f"{split}.jsonl"


def _str_field(obj: dict, key: str, path, line) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"field {key!r} must be a non-empty string", path=str(path), line=line, field=key)
    return v


def _options(obj: dict, key: str, path, line, field: str | None = None) -> dict:
    v = obj.get(key)
    field = field or key
    if not isinstance(v, dict) or len(v) < 2:
        raise UserError(f"field {key!r} must map at least two labels to texts", path=str(path), line=line, field=field)
    out = {}
    for k, t in v.items():
        if not isinstance(t, str):
            raise UserError(f"option {k!r} must be a string", path=str(path), line=line, field=field)
        out[str(k)] = t
    return out


def _upstream(task: str, obj: dict, path: Path, line: int | None, key: str | None) -> Item | None:
    """An item from PubMedQA's or MedQA's upstream forms, or None for a normalized item."""
    where = {"line": line} if line is not None else {}

    def fld(name):
        return name if line is not None or key is None else f"{key}.{name}"

    if task == "pubmedqa" and pubmedqa_shape(obj):
        if "QUESTION" in obj and line is not None and "id" not in obj:
            raise UserError("missing field 'id'", path=str(path), field="id", **where)
        pmid, rec = pubmedqa_record(obj, key, line, path)
        ctx = rec["CONTEXTS"]
        if not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
            raise UserError("field 'CONTEXTS' must be a list of strings", path=str(path), field=fld("CONTEXTS"), **where)
        q = rec["QUESTION"]
        if not isinstance(q, str) or not q.strip():
            raise UserError("field 'QUESTION' must be a non-empty string", path=str(path), field=fld("QUESTION"),
                            **where)
        ans = rec["final_decision"]
        if ans not in PUBMEDQA_LABELS:
            raise UserError(f"final_decision {ans!r} is not yes/no/maybe", path=str(path), field=fld("final_decision"),
                            **where)
        return Item(pmid, q, "\n".join(ctx), {k: k for k in PUBMEDQA_LABELS}, ans)
    shape = medqa_shape(obj) if task == "medqa" else None
    if shape in ("bigbio_qa", "bigbio_source") or (shape == "medqa" and "answer_idx" in obj):
        rid, rec = medqa_record(obj, key, line, path)
        opts = _options(rec, "options", path, line, fld("options"))
        ans = rec["answer_idx"]
        if ans not in opts:
            raise UserError(f"answer_idx {ans!r} is not one of the options {sorted(opts)}", path=str(path),
                            field=fld("answer_idx"), **where)
        return Item(rid or str(line if line is not None else key), rec["question"], "", opts, ans)
    return None


def _parse(task: str, obj: dict, path: Path, line: int | None, key: str | None = None) -> Item:
    it = _upstream(task, obj, path, line, key)
    if it is not None:
        return it
    if not isinstance(obj, dict):
        raise UserError("expected a JSON object", path=str(path), line=line, field=key)
    for k in ("id", "question", "options", "answer"):
        if k not in obj:
            raise UserError(f"missing field {k!r}", path=str(path), line=line, field=k)
    opts = _options(obj, "options", path, line)
    ans = obj["answer"]
    if ans not in opts:
        raise UserError(f"answer {ans!r} is not one of the options {sorted(opts)}", path=str(path), line=line, field="answer")
    ctx = obj.get("context") or ""
    if isinstance(ctx, list):
        ctx = "\n".join(map(str, ctx))
    if not isinstance(ctx, str):
        raise UserError("field 'context' must be a string", path=str(path), line=line, field="context")
    if task == "pubmedqa" and set(opts) != set(PUBMEDQA_LABELS):
        raise UserError("PubMedQA options must be yes/no/maybe", path=str(path), line=line, field="options")
    return Item(str(obj["id"]), _str_field(obj, "question", path, line), ctx, opts, ans)


def load_items(task: str, data: str | os.PathLike | None = None, split: str = "test",
               limit: int | None = None) -> tuple[list[Item], Path]:
    """Items of ``task`` from ``data`` (default: the bundled split), in file order."""
    path = Path(data) if data else default_data(task, split)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r} (one of {', '.join(TASKS)})", field="task")

    items: list[Item] = []
    seen: dict[str, str] = {}
    for key, obj, lineno in read_records(path):
        it = _parse(task, obj, path, lineno, key)
        if it.id in seen:
            raise UserError(f"duplicate id {it.id!r} (first at {seen[it.id]})", path=str(path), line=lineno,
                            field="id" if lineno is not None else f"{key}.id")
        seen[it.id] = f"line {lineno}" if lineno is not None else f"record {key}"
        items.append(it)
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError("no items", path=str(path))
    return items, path


def _numbered(path: Path):
    """(line number, object) pairs with read_jsonl's strict checks (blank lines keep their numbers)."""
    require_file(path, "data file")
    yield from read_jsonl_numbered(path)


# ---- prompts -------------------------------------------------------------------------------

def system_prompt(task: str, options: dict | None = None) -> str:
    """The MediLoRA system prompt of ``task`` (verbatim; MedQA's {first}/{last} from the options).

    One reader serves both sides: the SFT builders (corpora.sft) and the bench ask the same text.
    """
    if task not in TASKS:
        raise UserError(f"no system prompt for {task!r}", field=task)
    return _system_prompt(task, list(options) if options else None)


def question_block(task: str, item: Item) -> str:
    """The user message of ``item`` (without retrieved context)."""
    if task == "pubmedqa":
        return pubmedqa_user([item.context], item.question)
    ctx = f"Context: {item.context}\n\n" if item.context else ""
    return ctx + medqa_user(item.question, item.options)


def user_message(task: str, item: Item, rag_context: str = "") -> str:
    """Retrieved context (if any) goes before the question block."""
    q = question_block(task, item)
    return f"Reference material:\n{rag_context}\n\n{q}" if rag_context else q


def answer_text(task: str, label: str, item: Item) -> str:
    """How the expected answer is written (the continuation scored in log-likelihood mode)."""
    if task == "pubmedqa":
        return label
    return f"({label}) {item.options[label]}"
