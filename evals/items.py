"""Benchmark items: load PubMedQA / MedQA (raw or normalized) and build the MediLoRA prompts.

Normalized item (DESIGN.md): ``{"id", "question", "context", "options", "answer"}`` with
``options`` a mapping label -> text (PubMedQA: yes/no/maybe) and ``answer`` one of its labels.
Accepted inputs, line by line:

- PubMedQA as shipped (``evals/data/pubmedqa``): ``id``, ``QUESTION``, ``CONTEXTS``, ``final_decision``;
- MedQA as shipped (``evals/data/medqa``): ``question``, ``options`` {A..}, ``answer_idx`` (the id is
  the line number, as the data has none);
- normalized items (any task): ``id``, ``question``, ``options``, ``answer`` (``context`` optional).

Every problem names the file, the line and the field (``UserError``, exit 2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tools.errors import UserError
from tools.io import read_jsonl, require_file, sha256_file
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


def _options(obj: dict, key: str, path, line) -> dict:
    v = obj.get(key)
    if not isinstance(v, dict) or len(v) < 2:
        raise UserError(f"field {key!r} must map at least two labels to texts", path=str(path), line=line, field=key)
    out = {}
    for k, t in v.items():
        if not isinstance(t, str):
            raise UserError(f"option {k!r} must be a string", path=str(path), line=line, field=key)
        out[str(k)] = t
    return out


def _parse(task: str, obj: dict, path: Path, line: int) -> Item:
    if task == "pubmedqa" and "QUESTION" in obj:
        for k in ("id", "QUESTION", "CONTEXTS", "final_decision"):
            if k not in obj:
                raise UserError(f"missing field {k!r}", path=str(path), line=line, field=k)
        ctx = obj["CONTEXTS"]
        if not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
            raise UserError("field 'CONTEXTS' must be a list of strings", path=str(path), line=line, field="CONTEXTS")
        ans = obj["final_decision"]
        if ans not in PUBMEDQA_LABELS:
            raise UserError(f"final_decision {ans!r} is not yes/no/maybe", path=str(path), line=line, field="final_decision")
        return Item(str(obj["id"]), _str_field(obj, "QUESTION", path, line), "\n".join(ctx),
                    {k: k for k in PUBMEDQA_LABELS}, ans)
    if task == "medqa" and "answer_idx" in obj:
        for k in ("question", "options", "answer_idx"):
            if k not in obj:
                raise UserError(f"missing field {k!r}", path=str(path), line=line, field=k)
        opts = _options(obj, "options", path, line)
        ans = obj["answer_idx"]
        if ans not in opts:
            raise UserError(f"answer_idx {ans!r} is not one of the options {sorted(opts)}", path=str(path), line=line,
                            field="answer_idx")
        return Item(str(obj.get("id", line)), _str_field(obj, "question", path, line), "", opts, ans)
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
    seen: dict[str, int] = {}
    line = 0
    for lineno, obj in _numbered(path):
        line = lineno
        it = _parse(task, obj, path, lineno)
        if it.id in seen:
            raise UserError(f"duplicate id {it.id!r} (first on line {seen[it.id]})", path=str(path), line=lineno, field="id")
        seen[it.id] = lineno
        items.append(it)
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError("no items", path=str(path), line=line or None)
    return items, path


def _numbered(path: Path):
    """(line number, object) pairs with read_jsonl's strict checks (blank lines keep their numbers)."""
    require_file(path, "data file")
    it = read_jsonl(path)
    # read_jsonl yields objects for non-blank lines only; re-derive their numbers from the file
    with open(path, "rb") as f:
        numbers = [i for i, raw in enumerate(f, 1) if raw.strip()]
    for n, obj in zip(numbers, it):
        yield n, obj


def data_sha256(path: Path) -> str:
    return sha256_file(path)


# ---- prompts -------------------------------------------------------------------------------

def system_prompt(task: str, options: dict | None = None) -> str:
    """The MediLoRA system prompt of ``task`` (verbatim; MedQA's {first}/{last} from the options).

    One reader serves both sides: the SFT builders (corpora.sft) and the bench ask the same text.
    """
    from corpora.sft import system_prompt as _system_prompt

    if task not in TASKS:
        raise UserError(f"no system prompt for {task!r}", field=task)
    return _system_prompt(task, list(options) if options else None)


def question_block(task: str, item: Item) -> str:
    """The user message of ``item`` (without retrieved context)."""
    from corpora.sft import medqa_user, pubmedqa_user   # one formatter: train as you test

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
