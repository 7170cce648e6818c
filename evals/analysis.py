"""Error analysis of bench results and loss curves of training runs.

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
import json
import re
from pathlib import Path

from tools.errors import UserError
from tools.io import read_jsonl

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
        from tools.artifact import read_artifact
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if lengths:
        ax.hist(lengths, bins=min(30, max(5, len(set(lengths)))), color="#c0392b", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no incorrect predictions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("length of the prediction (tokens)")
    ax.set_ylabel("incorrect predictions")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, format="png", metadata={"Software": None})
    plt.close(fig)


def load_log_history(stage_dir: str | Path) -> list[dict]:
    d = Path(stage_dir)
    for cand in (d / "output" / "log_history.json", d / "log_history.json"):
        if cand.is_file():
            try:
                hist = json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"unreadable log history ({e.msg})", path=str(cand)) from None
            if isinstance(hist, dict):
                hist = hist.get("log_history", [])
            if hist:
                return hist
    for cand in (d / "output" / "trainer_state.json", d / "trainer_state.json"):
        if cand.is_file():
            hist = json.loads(cand.read_text()).get("log_history", [])
            if hist:
                return hist
    raise UserError("no training logs (log_history.json or trainer_state.json): train the stage first "
                    "with `tools train`", path=str(d))


def plot_loss(history: list[dict], out_png: str | Path, title: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        raise UserError("log history has no loss entries", field="log_history")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="o", ms=3)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="s", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, format="png", metadata={"Software": None})
    plt.close(fig)
    return {"train_points": len(train), "eval_points": len(evals),
            "final_train_loss": train[-1][1] if train else None,
            "final_eval_loss": evals[-1][1] if evals else None}
