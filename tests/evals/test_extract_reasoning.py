"""Answer extraction for reasoning models: what is inside <think>...</think> is never the answer."""
from __future__ import annotations

import pytest

from evals import extract

ABCD = ["A", "B", "C", "D"]


@pytest.mark.parametrize("text,label", [
    ("<think>Maybe (A)? No, the answer is (C).</think>\nThe answer is (B).", "B"),
    ("<think>A looks right</think>Final Answer: D", "D"),
    ("<think>I would say (A)</think>\n\nC", "C"),
    ("The template opened the block. Answer: A</think> answer is (B)", "B"),   # only the closing tag generated
    ("<think>still reasoning, answer is (A)", None),                          # never closed: no answer yet
    ("<think>x</think>", None),
    ("answer is (B)", "B"), ("Final Answer: B", "B"), ("B", "B"),             # no reasoning block
])
def test_medqa_answer_ignores_reasoning(text, label):
    assert extract.parse("medqa", text, ABCD).label == label


def test_open_block_is_not_decided_and_pubmedqa_cot():
    assert not extract.parse("medqa", "<think>the answer is (A)", ABCD, final=False).decided
    assert extract.parse("pubmedqa", "<think>no... </think>yes, because", ["yes", "no", "maybe"]).label == "yes"
    assert extract.parse_cot("medqa", "<think>Answer: A</think>\nreasons\nAnswer: C", ABCD).label == "C"
    assert extract.parse_cot("pubmedqa", "<think>Answer: no</think>", ["yes", "no", "maybe"]).label is None
