"""ChatML SFT sets from PubMedQA and MedQA, with the MediLoRA system prompts (verbatim).

Rows: ``{"id", "messages": [system, user, assistant], "meta": {...}}``. The prompt builders
(``pubmedqa_user``, ``medqa_user``, ``system_prompt``) are public so that evaluation prompts can be
built the same way as training prompts.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from tools.artifact import Stage
from tools.errors import UserError
from tools.io import read_jsonl, write_jsonl
from tools.paths import bundled_data, system_prompts_file

from .upstream import medqa_record, pubmedqa_record, read_records

PUBMEDQA_LABELS = ("yes", "no", "maybe")


@lru_cache(maxsize=None)
def _prompts(path: str) -> dict:
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("system prompts file not found", path=str(p)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"malformed system prompts YAML ({type(e).__name__})", path=str(p)) from None
    for k in ("pubmedqa", "medqa"):
        if not isinstance(doc, dict) or not isinstance(doc.get(k), str) or not doc[k].strip():
            raise UserError(f"missing system prompt {k!r}", path=str(p), field=k)
    return doc


def system_prompt(task: str, letters: list[str] | None = None, path=None) -> str:
    """The verbatim system prompt; MedQA's ``{first}``/``{last}`` become the option letters."""
    text = _prompts(str(path or system_prompts_file()))[task].strip()
    if task == "medqa":
        letters = letters or ["A", "B", "C", "D"]
        text = text.replace("{first}", letters[0]).replace("{last}", letters[-1])
    return text


# The user messages match the ones the benchmark asks (evals/items.py question_block): train as you test.
PUBMEDQA_INSTRUCTION = "Answer with yes, no or maybe."
MEDQA_INSTRUCTION = "Answer with the letter of the correct option."


def pubmedqa_user(contexts: list[str], question: str) -> str:
    """Context, then question (then the answer instruction the benchmark uses)."""
    return ("Context: " + "\n".join(str(c) for c in contexts) + f"\n\nQuestion: {question.strip()}"
            f"\n\n{PUBMEDQA_INSTRUCTION}")


def pubmedqa_assistant(label: str, long_answer: str) -> str:
    return f"{label}. {long_answer.strip()}".strip()


def medqa_user(question: str, options: dict[str, str]) -> str:
    """Question, then the options as "(A) text" lines (then the benchmark's answer instruction)."""
    opts = "\n".join(f"({k}) {str(v).strip()}" for k, v in options.items())
    return f"Question: {question.strip()}\n\nOptions:\n{opts}\n\n{MEDQA_INSTRUCTION}"


def medqa_assistant(letter: str, options: dict[str, str]) -> str:
    return f"({letter}) {str(options[letter]).strip()}"


# -- readers ------------------------------------------------------------------------------------
def read_pubmedqa(path) -> list[tuple[str, dict, int | None]]:
    """(pmid, item, line) from our JSONL form ({"id", QUESTION, CONTEXTS, ...}), the official
    ``ori_pqal.json`` / ``test_set.json`` ({pmid: {...}}) or the Hub's ``pqa_labeled`` export
    (JSONL, JSON or Parquet); items in the canonical (ori_pqal) form."""
    return [(*pubmedqa_record(obj, key, line, path), line) for key, obj, line in read_records(path, "PubMedQA file")]


def _need(item, key, typ, path, line, pmid):
    v = item.get(key) if isinstance(item, dict) else None
    if not isinstance(v, typ) or (isinstance(v, (str, list)) and not v):
        where = key if line is not None else f"{pmid}.{key}"
        raise UserError(f"missing or empty {key}", path=str(path), line=line, field=where)
    return v


@lru_cache(maxsize=1)
def pubmedqa_test_ids() -> frozenset[str]:
    """The 500 official PubMedQA test PMIDs (the benchmark: never train on them)."""
    return frozenset(str(o["id"]) for o in read_jsonl(bundled_data() / "pubmedqa" / "test.jsonl", required=("id",)))


def norm_question(q: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", q.lower()).split())


@lru_cache(maxsize=1)
def medqa_test_questions() -> frozenset[str]:
    return frozenset(norm_question(o["question"]) for o in read_jsonl(bundled_data() / "medqa" / "test.jsonl",
                                                                       required=("question",)))


# -- builders -----------------------------------------------------------------------------------
def build_pubmedqa(out, *, src=None, allow_test_ids: bool = False, force: bool = False, log=None):
    src = Path(src) if src else bundled_data() / "pubmedqa" / "dev.jsonl"
    prompts = system_prompts_file()
    params = {"allow_test_ids": allow_test_ids, "format": "chatml"}
    with Stage("dataset.pubmedqa", out, params, inputs=[src, prompts], force=force, log=log) as st:
        if st.skipped:
            return st.result
        test_ids = pubmedqa_test_ids()
        sys_prompt = system_prompt("pubmedqa")
        rows, labels, skipped_test = [], Counter(), 0
        seen = set()
        for pmid, item, line in read_pubmedqa(src):
            q = _need(item, "QUESTION", str, src, line, pmid)
            ctx = _need(item, "CONTEXTS", list, src, line, pmid)
            if not all(isinstance(c, str) for c in ctx):
                raise UserError("CONTEXTS must be a list of texts", path=str(src), line=line,
                                field="CONTEXTS" if line is not None else f"{pmid}.CONTEXTS")
            label = _need(item, "final_decision", str, src, line, pmid).strip().lower()
            long_answer = _need(item, "LONG_ANSWER", str, src, line, pmid)
            if label not in PUBMEDQA_LABELS:
                raise UserError(f"final_decision must be yes/no/maybe, got {label!r}", path=str(src), line=line,
                                field="final_decision")
            if pmid in seen:
                raise UserError(f"duplicate PMID {pmid}", path=str(src), line=line, field="id")
            seen.add(pmid)
            if pmid in test_ids and not allow_test_ids:
                skipped_test += 1
                continue
            rows.append({"id": f"pubmedqa-{pmid}", "messages": [
                {"role": "system", "content": sys_prompt},
                {"role": "user", "content": pubmedqa_user([str(c) for c in ctx], q)},
                {"role": "assistant", "content": pubmedqa_assistant(label, long_answer)}],
                "meta": {"dataset": "pubmedqa", "pmid": pmid, "label": label,
                         "year": item["YEAR"], "meshes": item["MESHES"]}})
            labels[label] += 1
        if not rows:
            raise UserError(f"no item left: all {skipped_test} are PubMedQA benchmark test ids "
                            "(train on dev.jsonl; --allow-test-ids overrides)", path=str(src))
        write_jsonl(st.path("train.jsonl"), rows)
        st.lineage.licenses.add("MIT (PubMedQA)")
        st.lineage.sources.add("PubMedQA PQA-L")
        st.extra.update({"items": len(rows), "labels": dict(sorted(labels.items())),
                         "excluded_test_ids": skipped_test})
    return st.result


def build_medqa(out, *, src=None, allow_test: bool = False, force: bool = False, log=None):
    src = Path(src) if src else bundled_data() / "medqa" / "dev.jsonl"
    prompts = system_prompts_file()
    params = {"allow_test": allow_test, "format": "chatml"}
    with Stage("dataset.medqa", out, params, inputs=[src, prompts], force=force, log=log) as st:
        if st.skipped:
            return st.result
        test_q = medqa_test_questions()
        rows, answers, sizes, skipped_test = [], Counter(), Counter(), 0
        seen_ids: dict[str, int | str] = {}
        for i, (key, raw, line) in enumerate(read_records(src, "MedQA file"), 1):
            rid, item = medqa_record(raw, key, line, src)
            n = line if line is not None else i
            where = {"line": line} if line is not None else {}

            def fld(name, key=key, line=line):
                return name if line is not None or key is None else f"{key}.{name}"
            q, opts = item["question"], item["options"]
            if not isinstance(opts, dict) or not 2 <= len(opts) <= 26 or not all(isinstance(v, str) for v in opts.values()):
                raise UserError("options must map letters to texts", path=str(src), field=fld("options"), **where)
            letters = sorted(opts)
            if letters != [chr(ord("A") + i) for i in range(len(letters))]:
                raise UserError(f"option letters must be A.. in order, got {','.join(letters)}", path=str(src),
                                field=fld("options"), **where)
            opts = {k: opts[k] for k in letters}
            letter = item["answer_idx"]
            if letter is None and isinstance(item.get("answer"), str):
                hits = [k for k, v in opts.items() if v.strip() == item["answer"].strip()]
                letter = hits[0] if len(hits) == 1 else None
            if letter not in opts:
                raise UserError(f"answer_idx {letter!r} is not one of the options", path=str(src),
                                field=fld("answer_idx"), **where)
            if rid is not None:
                if rid in seen_ids:
                    raise UserError(f"duplicate id {rid!r} (first at {seen_ids[rid]})", path=str(src),
                                    field=fld("id"), **where)
                seen_ids[rid] = f"line {line}" if line is not None else f"record {key}"
            if not allow_test and norm_question(q) in test_q:
                skipped_test += 1
                continue
            # the source file's stem keeps ids of different splits apart (BigBio numbers each split from 0)
            rows.append({"id": f"medqa-{src.stem}-{n if rid is None else rid}", "messages": [
                {"role": "system", "content": system_prompt("medqa", letters)},
                {"role": "user", "content": medqa_user(q, opts)},
                {"role": "assistant", "content": medqa_assistant(letter, opts)}],
                "meta": {"dataset": "medqa", "line": n, "answer": letter, "n_options": len(letters),
                         "meta_info": item["meta_info"]}})
            answers[letter] += 1
            sizes[len(letters)] += 1
        if not rows:
            raise UserError(f"no item left ({skipped_test} are MedQA benchmark test questions; --allow-test overrides)",
                            path=str(src))
        write_jsonl(st.path("train.jsonl"), rows)
        st.lineage.licenses.add("MIT (MedQA)")
        st.lineage.sources.add("MedQA USMLE")
        st.extra.update({"items": len(rows), "answers": dict(sorted(answers.items())),
                         "options": {str(k): v for k, v in sorted(sizes.items())},
                         "excluded_test_questions": skipped_test})
    return st.result
