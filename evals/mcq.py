"""`tools bench mcq`: any multiple-choice or yes/no/maybe JSONL under the MediLoRA protocol.

A row: ``question`` (string), ``options`` (a list of texts, lettered A, B, C... in order, or a
mapping label -> text), ``answer`` (a label, the text of one option, or an index into the options), optional ``context``
(string or list of strings) and ``id`` (default: the line number). Integer answers are 0-based or
1-based by file, never guessed: a 0 anywhere means 0-based, the option count anywhere (4 of 4) means
1-based (MedMCQA's GitHub release counts ``cop`` from 1, its Hub export from 0); a file whose
integers show neither is refused unless ``answer_base`` (``--answer-base 0|1``) says which.
A ``.csv`` file is read in MMLU's layout (no header: question, A, B, C, D, answer letter; ids are
row numbers). ``--map TARGET=SOURCE`` renames fields (``--map question=stem --map answer=cop``); ``options`` may
be gathered from several fields (``--map options=opa+opb+opc+opd``, MedMCQA's layout).

Sets whose options are exactly yes / no / maybe are asked and parsed like PubMedQA (the
``pubmedqa`` flavour); every other set like MedQA (lettered options, the ``medqa`` flavour): mapping
labels that are not single letters are re-lettered in order. Any bad row is one ``UserError``
naming ``FILE:LINE [field]``.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

from tools.errors import UserError

from .items import PUBMEDQA_LABELS, Item, _numbered
from .lm_eval_tasks.utils import mmlu_csv

FIELDS = ("id", "question", "options", "answer", "context")
MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")


def parse_map(specs: tuple[str, ...] | list[str] | None) -> dict[str, list[str]]:
    """``("question=stem", "options=opa+opb")`` -> {"question": ["stem"], "options": ["opa", "opb"]}."""
    out: dict[str, list[str]] = {}
    for spec in specs or ():
        if "=" not in spec:
            raise UserError(f"--map {spec!r} is not TARGET=SOURCE", field="--map")
        tgt, src = (s.strip() for s in spec.split("=", 1))
        if tgt not in FIELDS:
            raise UserError(f"--map target {tgt!r} is not one of {', '.join(FIELDS)}", field="--map")
        srcs = [s.strip() for s in src.split("+") if s.strip()]
        if not srcs or (len(srcs) > 1 and tgt != "options"):
            raise UserError(f"--map {spec!r}: only options may gather several fields (a+b+c)", field="--map")
        out[tgt] = srcs
    return out


def _get(obj: dict, tgt: str, mapping: dict[str, list[str]]):
    srcs = mapping.get(tgt, [tgt])
    if len(srcs) > 1:
        if not all(s in obj for s in srcs):
            return None, srcs[0] if srcs[0] not in obj else next(s for s in srcs if s not in obj)
        return [obj[s] for s in srcs], "+".join(srcs)
    return obj.get(srcs[0]), srcs[0]


def index_base(answers: list[tuple[int, int]], declared: int | None, path: Path, field: str) -> int:
    """0 or 1: the base of a file's integer answers, from (answer, option count) pairs, or ``declared``."""
    if declared is not None:
        if declared not in (0, 1):
            raise UserError("must be 0 or 1", field="--answer-base")
        return declared
    zero = any(a == 0 for a, _ in answers)
    top = any(a == n for a, n in answers)
    if zero and top:
        raise UserError("integer answers run from 0 to the option count: neither 0- nor 1-based", path=str(path),
                        field=field)
    if zero or top or not answers:
        return 0 if zero or not answers else 1
    lo, hi = min(a for a, _ in answers), max(a for a, _ in answers)
    raise UserError(f"integer answers {lo}..{hi} could be 0-based or 1-based (MedMCQA's GitHub release counts cop "
                    "from 1, its Hub export from 0): pass --answer-base 0 or 1", path=str(path), field=field)


def _int_answers(rows: list[tuple[int, object]], mapping: dict) -> tuple[list[tuple[int, int]], str]:
    """(integer answer, option count) of every row that has both, and the answer's field name."""
    pairs, af = [], "answer"
    for _, obj in rows:
        if not isinstance(obj, dict):
            continue
        a, af = _get(obj, "answer", mapping)
        opts, _ = _get(obj, "options", mapping)
        if isinstance(a, int) and not isinstance(a, bool) and isinstance(opts, (list, dict)):
            pairs.append((a, len(opts)))
    return pairs, af


def _row(obj: dict, mapping: dict, path: Path, line: int, base: int = 0) -> tuple[Item, bool]:
    if not isinstance(obj, dict):
        raise UserError("expected a JSON object", path=str(path), line=line)
    q, qf = _get(obj, "question", mapping)
    if q is None:
        raise UserError(f"missing field {qf!r}", path=str(path), line=line, field=qf)
    if not isinstance(q, str) or not q.strip():
        raise UserError(f"field {qf!r} must be a non-empty string", path=str(path), line=line, field=qf)
    opts, of = _get(obj, "options", mapping)
    if opts is None:
        raise UserError(f"missing field {of!r}", path=str(path), line=line, field=of)
    as_list = isinstance(opts, list)
    if as_list:
        if len(opts) > 26:
            raise UserError("more than 26 options", path=str(path), line=line, field=of)
        opts = {string.ascii_uppercase[i]: t for i, t in enumerate(opts)}
    if not isinstance(opts, dict) or len(opts) < 2:
        raise UserError(f"field {of!r} must be a list of at least two texts or a mapping label -> text",
                        path=str(path), line=line, field=of)
    for k, t in opts.items():
        if not isinstance(t, str) or not t.strip():
            raise UserError(f"option {k!r} must be a non-empty string", path=str(path), line=line, field=of)
    a, af = _get(obj, "answer", mapping)
    if a is None:
        raise UserError(f"missing field {af!r}", path=str(path), line=line, field=af)
    labels = [str(k) for k in opts]
    texts = [str(t) for t in opts.values()]
    if isinstance(a, bool) or not isinstance(a, (str, int)):
        raise UserError(f"field {af!r} must be a label, an option text or an index", path=str(path), line=line, field=af)
    if isinstance(a, int):
        if not base <= a < len(labels) + base:
            raise UserError(f"answer index {a} out of range {base}..{len(labels) - 1 + base} ({base}-based)",
                            path=str(path), line=line, field=af)
        ans = labels[a - base]
    elif a in labels:
        ans = a
    elif a.strip() in texts and texts.count(a.strip()) == 1:
        ans = labels[texts.index(a.strip())]
    elif a.strip().upper() in labels:
        ans = a.strip().upper()
    else:
        raise UserError(f"answer {a!r} is neither a label {labels} nor the text of one option", path=str(path),
                        line=line, field=af)
    ctx, cf = _get(obj, "context", mapping)
    if isinstance(ctx, list) and all(isinstance(c, str) for c in ctx):
        ctx = "\n".join(ctx)
    if ctx is not None and not isinstance(ctx, str):
        raise UserError(f"field {cf!r} must be a string or a list of strings", path=str(path), line=line, field=cf)
    iv, _ = _get(obj, "id", mapping)
    iid = str(iv) if iv is not None and not isinstance(iv, (dict, list)) else str(line)
    names = texts if as_list else labels  # a list of texts ["yes", "no", "maybe"] or labels yes/no/maybe
    yn = len(names) == 3 and {x.strip().lower() for x in names} == set(PUBMEDQA_LABELS)
    if yn:
        lower = {lab: name.strip().lower() for lab, name in zip(labels, names)}
        return Item(iid, q, ctx or "", {k: k for k in PUBMEDQA_LABELS}, lower[ans]), True
    if all(len(k) == 1 and k.upper() in string.ascii_uppercase for k in labels) and \
            len({k.upper() for k in labels}) == len(labels):
        relabel = {k: k.upper() for k in labels}
    else:
        relabel = {k: string.ascii_uppercase[i] for i, k in enumerate(labels)}
    return Item(iid, q, ctx or "", {relabel[k]: t for k, t in opts.items()}, relabel[ans]), False


def _mmlu_rows(path: Path) -> list[tuple[int, dict]]:
    """(row number, MCQ row) of an MMLU CSV (question, A, B, C, D, answer letter)."""
    return [(i, {"id": str(i), "question": d["question"], "options": d["choices"], "answer": "ABCD"[d["answer"]]})
            for i, d in enumerate(mmlu_csv(path, path.stem), 1)]


def load_mcq(data: str | os.PathLike, mapping: dict[str, list[str]] | None = None,
             limit: int | None = None) -> tuple[list[Item], Path, str]:
    """(items, path, flavour) of an MCQ JSONL; flavour ``pubmedqa`` (all rows yes/no/maybe) or ``medqa``.

    ``mapping["answer_base"] == ["0"|"1"]`` (``--answer-base``) declares the base of integer answers;
    otherwise it is told from the whole file (not only the first ``limit`` rows) or refused."""
    path = Path(data)
    mapping = dict(mapping or {})
    declared = mapping.pop("answer_base", None)
    rows = _mmlu_rows(path) if path.suffix.lower() == ".csv" else list(_numbered(path))
    ints, af = _int_answers(rows, mapping)
    base = None
    try:
        base = index_base(ints, int(declared[0]) if declared else None, path, af)
    except UserError as e:
        ambiguous = e  # raised after the rows' own errors, which name a line
    items: list[Item] = []
    kinds: set[bool] = set()
    seen: dict[str, int] = {}
    line = 0
    for lineno, obj in rows:
        line = lineno
        it, yn = _row(obj, mapping, path, lineno, base or 0)
        if it.id in seen:
            raise UserError(f"duplicate id {it.id!r} (first on line {seen[it.id]})", path=str(path), line=lineno,
                            field="id")
        if kinds and yn not in kinds:
            raise UserError("mixes yes/no/maybe rows with lettered multiple-choice rows", path=str(path), line=lineno,
                            field="options")
        kinds.add(yn)
        seen[it.id] = lineno
        items.append(it)
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError("no items", path=str(path), line=line or None)
    if base is None:
        raise ambiguous
    return items, path, ("pubmedqa" if True in kinds else "medqa")


def medmcqa_docs(path: str | os.PathLike, answer_base: int | None = None) -> list[dict]:
    """MedMCQA rows (GitHub ``dev.json`` with a 1-based ``cop``, or the Hub export with a 0-based one)
    as the Hub's ``openlifescienceai/medmcqa`` rows lm-eval reads (``cop`` 0-based)."""
    path = Path(path)
    rows = list(_numbered(path))
    for line, obj in rows:
        for k in ("question", *MEDMCQA_OPTIONS, "cop"):
            if not isinstance(obj, dict) or k not in obj:
                raise UserError(f"missing field {k!r} (a MedMCQA row has question, opa..opd, cop)", path=str(path),
                                line=line, field=k)
        if not isinstance(obj["cop"], int) or isinstance(obj["cop"], bool):
            raise UserError(f"cop {obj['cop']!r} is not an integer", path=str(path), line=line, field="cop")
        for k in ("question", *MEDMCQA_OPTIONS):
            if not isinstance(obj[k], str):
                raise UserError(f"field {k!r} must be a string", path=str(path), line=line, field=k)
    base = index_base([(o["cop"], 4) for _, o in rows], answer_base, path, "cop")
    docs = []
    for line, obj in rows:
        if not base <= obj["cop"] < 4 + base:
            raise UserError(f"cop {obj['cop']} out of range {base}..{3 + base} ({base}-based)", path=str(path),
                            line=line, field="cop")
        docs.append({"id": str(obj.get("id", line)), "question": obj["question"],
                     **{k: obj[k] for k in MEDMCQA_OPTIONS}, "cop": obj["cop"] - base,
                     "subject_name": obj.get("subject_name") or ""})
    if not docs:
        raise UserError("no items", path=str(path))
    return docs
