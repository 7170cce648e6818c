"""Reward functions for `tools stage dpo --method grpo` (TRL's GRPO through Axolotl: ``trl.reward_funcs``).

A completion earns 1.0 when the bench's own answer extraction (evals.extract, lenient) reads the
gold label from it, else 0.0, so GRPO optimizes exactly what `tools bench` counts. The pairs rows
carry what is needed in ``meta`` (``task``, ``gold``, ``labels``); TRL passes dataset columns to
reward functions as keyword arguments.
"""
from __future__ import annotations

from .extract import parse


def _text(completion) -> str:
    """A completion as TRL hands it: plain text, or a list of chat messages (the last one's content)."""
    if isinstance(completion, list) and completion:
        return str(completion[-1].get("content", ""))
    return str(completion)


def answer_correct(prompts, completions, meta=None, **_) -> list[float]:
    """1.0 for each completion whose extracted answer is the gold label, else 0.0."""
    meta = meta or [{}] * len(completions)
    out = []
    for c, m in zip(completions, meta):
        labels = m.get("labels") or (["yes", "no", "maybe"] if m.get("task") == "pubmedqa" else list("ABCD"))
        got = parse(m.get("task", "pubmedqa"), _text(c), labels, final=True).label
        out.append(1.0 if got is not None and got == m.get("gold") else 0.0)
    return out
