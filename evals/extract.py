"""Answer extraction from generated text: strict and lenient forms, and "is the answer decided yet?".

Only the text generated for an item is looked at, so a label can never be carried over from
another item; an unparseable answer has label ``None`` and counts as wrong.

PubMedQA: strict = the response starts with yes / no / maybe (case, leading spaces, markdown and
quotes tolerated; the word must end there: "yesterday" is not "yes"); lenient adds "answer: no",
"the answer is maybe" anywhere.
MedQA: strict = the response starts with "(A)".."(D)"; lenient adds "A)", "A.", "A:" or a bare "A" at the start,
"Answer: A" / "the answer is (B)" anywhere and a parenthesised "(C)" anywhere.

Reasoning models: text inside ``<think>...</think>`` is never the answer (``answer_part``); an
answer is read only after the block closes.

``decided`` tells the generator it may stop: the answer can no longer change however the text
goes on (a strict answer has been read, or a lenient one with nothing able to precede it as strict).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_LEAD = r"[\s*_\"'`#>\-]*"
_END = "\n"  # appended when the text is final: the end of text is a word boundary


@dataclass(frozen=True)
class Parsed:
    label: str | None  # the answer used for accuracy (strict if any, else lenient)
    strict: bool       # the answer came in the strict form
    decided: bool      # more text cannot change ``label``

    @property
    def valid(self) -> bool:
        return self.label is not None


_PQA_STRICT = re.compile("^" + _LEAD + r"(yes|no|maybe)(?=[^a-z0-9])")
_PQA_LENIENT = re.compile(r"\banswer(?:\s+is)?\s*[:\-]?" + _LEAD + r"[(\[]?(yes|no|maybe)(?=[^a-z0-9])")
_PQA_LEAD = re.compile("^" + _LEAD)


def parse_pubmedqa(text: str, final: bool = True) -> Parsed:
    t = text.lower() + (_END if final else "")
    m = _PQA_STRICT.match(t)
    if m:
        return Parsed(m.group(1), True, True)
    rest = t[_PQA_LEAD.match(t).end():]
    could_be_strict = not final and any(w.startswith(rest) for w in ("yes", "no", "maybe"))
    m = _PQA_LENIENT.search(t)
    if m and not could_be_strict:
        return Parsed(m.group(1), False, True)
    return Parsed(None, False, final)


_MQ_STRICT = re.compile("^" + _LEAD + r"\(([A-Za-z])\)")
_MQ_LEAD_FORMS = re.compile("^" + _LEAD + r"([A-Za-z])(?:[).:]|\s+-)(?=[^A-Za-z0-9]|$)")
_MQ_ANSWER = re.compile(r"\banswer(?:\s+is)?\s*[:\-]?" + _LEAD + r"\(?([A-Za-z])\)?(?=[^A-Za-z0-9])", re.IGNORECASE)
_MQ_PAREN = re.compile(r"\(([A-Za-z])\)")
_MQ_BARE = re.compile("^" + _LEAD + r"([A-Z])[\s*_\"'`.]*$")
_MQ_LEAD = re.compile("^" + _LEAD)


def parse_medqa(text: str, labels, final: bool = True) -> Parsed:
    labels = [str(x).upper() for x in labels]
    t = text + (_END if final else "")
    m = _MQ_STRICT.match(t)
    if m and m.group(1).upper() in labels:
        return Parsed(m.group(1).upper(), True, True)
    rest = t[_MQ_LEAD.match(t).end():]
    could_be_strict = not final and (rest == "" or rest == "(" or (len(rest) == 2 and rest[0] == "("))
    # a lone letter at the start may still become "A)" or "A." (lenient) or a word ("Among")
    could_be_lead = not final and len(rest) <= 1
    if could_be_strict or could_be_lead:
        return Parsed(None, False, False)
    for rx in (_MQ_LEAD_FORMS, _MQ_BARE, _MQ_ANSWER, _MQ_PAREN):
        if rx is _MQ_BARE and not final:
            continue
        for m in (rx.finditer(t) if rx in (_MQ_ANSWER, _MQ_PAREN) else [rx.match(t)]):
            if m and m.group(1).upper() in labels:
                # a bare "(C)" could still be overruled by a later "the answer is B"
                return Parsed(m.group(1).upper(), False, final or rx is not _MQ_PAREN)
    return Parsed(None, False, final)


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def answer_part(text: str) -> str:
    """The text a reasoning model gives as its answer: whatever follows its last ``</think>``
    (the template may have opened the block in the prompt), with closed ``<think>...</think>`` blocks
    removed and an unterminated ``<think>`` cutting off the rest (still reasoning)."""
    low = text.lower()
    if "</think>" in low:
        text = text[low.rfind("</think>") + len("</think>"):]
    text = _THINK_BLOCK.sub("", text)
    i = text.lower().find("<think>")
    return text if i < 0 else text[:i]


def parse(task: str, text: str, labels, final: bool = True) -> Parsed:
    text = answer_part(text)
    if task == "pubmedqa":
        return parse_pubmedqa(text, final)
    return parse_medqa(text, labels, final)


# ---- chain of thought: reasoning, then a final answer line ---------------------------------------
# The fixed final form the CoT prompt asks for: a line "Answer: <label>" (PubMedQA: yes/no/maybe;
# multiple choice: the option letter, optionally in parentheses). The last such line counts; the
# response is valid when one parses, whatever the reasoning before it says.
_COT_PQA = re.compile(r"(?im)^" + _LEAD + r"(?:final\s+)?answer\s*[:\-]" + _LEAD + r"[(\[]?(yes|no|maybe)(?=[^a-z0-9])")
_COT_MQ = re.compile(r"(?m)^" + _LEAD + r"(?:final\s+)?answer\s*[:\-]" + _LEAD + r"\(?([A-Za-z])\)?(?=[^A-Za-z0-9])",
                     re.IGNORECASE)


def cot_instruction(task: str, labels) -> str:
    """What the CoT prompt appends to the question: reason first, then the fixed final line."""
    if task == "pubmedqa":
        form = "Answer: yes, Answer: no or Answer: maybe"
    else:
        labs = [str(x) for x in labels]
        form = f"Answer: X, where X is one letter from {labs[0]} to {labs[-1]}"
    return ("Think step by step: explain your reasoning briefly, then give your final answer on its own last line "
            f"in the form {form}.")


def parse_cot(task: str, text: str, labels, final: bool = True) -> Parsed:
    """The label of the last final-answer line ("Answer: X"); decided as soon as one is complete
    (generation may stop there: the final form has been given)."""
    t = answer_part(text) + (_END if final else "")
    if task == "pubmedqa":
        found = [m.group(1).lower() for m in _COT_PQA.finditer(t)]
    else:
        labs = {str(x).upper() for x in labels}
        found = [m.group(1).upper() for m in _COT_MQ.finditer(t) if m.group(1).upper() in labs]
    if found:
        return Parsed(found[-1], True, True)
    return Parsed(None, False, final)
