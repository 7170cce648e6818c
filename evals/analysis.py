"""Error analysis of bench results.

Error classes (documented rules, applied in this order to each per-item record):

1. ``correct``        the parsed answer equals the gold answer (the bench's own ``correct`` flag).
                      For free-text items (no label set) a token-F1 with the reference >= 0.5.
2. ``underspecified`` no answer could be parsed from the output (empty, a refusal, a hedge, a
                      label outside the option set), or the output has fewer than ``min_tokens``
                      tokens; for free text, a token-F1 with the reference in [0.2, 0.5).
3. ``incorrect``      an answer was parsed and it is not the gold one (free text: F1 < 0.2).

Lengths are counted in whitespace-separated tokens of the raw output (model-independent).
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

from tools.artifact import Stage, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl, write_json, write_jsonl
from tools.plotting import pyplot, save_png

RULES = __doc__.split("Error classes", 1)[1].split("Lengths are", 1)[0].strip()

_OUT_KEYS = ("raw_output", "output", "raw", "response", "prediction", "text")
_PARSED_KEYS = ("parsed", "parsed_answer", "pred", "prediction_label")
_GOLD_KEYS = ("gold", "answer", "label", "reference")


def _first(d: dict, keys):
    for k in keys:
        if k in d:
            return d[k]
    return None


def token_f1(a: str, b: str) -> float:
    ta, tb = re.findall(r"\w+", a.lower()), re.findall(r"\w+", b.lower())
    if not ta or not tb:
        return 0.0
    common = collections.Counter(ta) & collections.Counter(tb)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(ta), same / len(tb)
    return 2 * p * r / (p + r)


def classify(item: dict, min_tokens: int = 1) -> str:
    out = str(_first(item, _OUT_KEYS) or "")
    n_tok = len(out.split())
    parsed = _first(item, _PARSED_KEYS)
    gold = _first(item, _GOLD_KEYS)
    correct = item.get("correct")
    if parsed is None and correct is None and gold is not None:  # free-text item
        f1 = token_f1(out, str(gold))
        return "correct" if f1 >= 0.5 else "underspecified" if f1 >= 0.2 else "incorrect"
    if correct is None:
        correct = parsed is not None and gold is not None and str(parsed).strip().lower() == str(gold).strip().lower()
    if correct:
        return "correct"
    if parsed in (None, "") or n_tok < min_tokens:
        return "underspecified"
    return "incorrect"


def analyze_errors(results_dir: str | Path, min_tokens: int = 1) -> dict:
    d = Path(results_dir)
    f = d / "items.jsonl" if d.is_dir() else d
    if d.is_dir():
        read_artifact(d)
    rows = list(read_jsonl(f))
    if not rows:
        raise UserError("no items", path=str(f))
    classes = collections.Counter()
    incorrect_lengths = []
    per_item = []
    for r in rows:
        c = classify(r, min_tokens)
        classes[c] += 1
        out = str(_first(r, _OUT_KEYS) or "")
        if c == "incorrect":
            incorrect_lengths.append(len(out.split()))
        per_item.append({"id": r.get("id"), "class": c, "length": len(out.split())})
    n = len(rows)
    return {"n": n, "counts": {k: classes.get(k, 0) for k in ("correct", "underspecified", "incorrect")},
            "shares": {k: classes.get(k, 0) / n for k in ("correct", "underspecified", "incorrect")},
            "incorrect_lengths": incorrect_lengths, "items": per_item, "rules": RULES}


def plot_length_histogram(lengths: list[int], out_png: str | Path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if lengths:
        ax.hist(lengths, bins=min(30, max(5, len(set(lengths)))), color="#c0392b", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no incorrect predictions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("length of the prediction (tokens)")
    ax.set_ylabel("incorrect predictions")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, out_png)


def run_errors(results_dir: str | Path, out: str | Path | None = None, *, min_tokens: int = 1, force: bool = False):
    """`tools analyze errors`: artifact ``analyze.errors`` (errors.json, classes.jsonl, histogram, report)."""
    rd = Path(results_dir)
    out = Path(out) if out else rd.parent / f"{rd.name}-errors"
    with Stage("analyze.errors", out, {"min_tokens": min_tokens}, inputs=[rd], force=force) as st:
        if st.skipped:
            return st.result
        res = analyze_errors(rd, min_tokens)
        write_jsonl(st.path("classes.jsonl"), res.pop("items"))
        write_json(st.path("errors.json"), res)
        plot_length_histogram(res["incorrect_lengths"], st.path("incorrect_lengths.png"),
                              f"Lengths of incorrect predictions ({rd.name})")
        lines = ["# Error analysis", "", f"Results: `{rd.name}` ({res['n']} items)", "",
                 "| class | items | share |", "|---|---|---|"]
        lines += [f"| {k} | {res['counts'][k]} | {res['shares'][k]:.1%} |" for k in res["counts"]]
        lines += ["", "## Rules", "", RULES, "", "![lengths](incorrect_lengths.png)", ""]
        st.path("report.md").write_text("\n".join(lines))
        st.extra.update({"n": res["n"], "counts": res["counts"], "shares": res["shares"]})
    return st.result
