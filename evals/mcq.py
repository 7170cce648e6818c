"""`tools bench mcq`: any multiple-choice or yes/no/maybe JSONL under the MediLoRA protocol.

A row: ``question`` (string), ``options`` (a list of texts, lettered A, B, C... in order, or a
mapping label -> text), ``answer`` (a label, the text of one option, or a 0-based index into a
list), optional ``context`` (string or list of strings) and ``id`` (default: the line number).
``--map TARGET=SOURCE`` renames fields (``--map question=stem --map answer=cop``); ``options`` may
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

from .items import PUBMEDQA_LABELS, Item

FIELDS = ("id", "question", "options", "answer", "context")


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


def _row(obj: dict, mapping: dict, path: Path, line: int) -> tuple[Item, bool]:
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
        if not 0 <= a < len(labels):
            raise UserError(f"answer index {a} out of range 0..{len(labels) - 1}", path=str(path), line=line, field=af)
        ans = labels[a]
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


def load_mcq(data: str | os.PathLike, mapping: dict[str, list[str]] | None = None,
             limit: int | None = None) -> tuple[list[Item], Path, str]:
    """(items, path, flavour) of an MCQ JSONL; flavour ``pubmedqa`` (all rows yes/no/maybe) or ``medqa``."""
    from .items import _numbered

    path = Path(data)
    mapping = mapping or {}
    items: list[Item] = []
    kinds: set[bool] = set()
    seen: dict[str, int] = {}
    line = 0
    for lineno, obj in _numbered(path):
        line = lineno
        it, yn = _row(obj, mapping, path, lineno)
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
    return items, path, ("pubmedqa" if True in kinds else "medqa")
