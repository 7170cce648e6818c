"""General (non-medical) English that ships with Python itself, for the forgetting check and replay.

The CPython documentation's topic pages (``pydoc_data.topics``: the language reference behind
``help("assert")``, 79 pages in 3.11, ~465k characters; PSF-2.0) are in every Python install, so
they need no download and carry a clear license. They are cut in two disjoint halves by position
in key order: the *held-out* half (even positions) is what `tools eval general` scores, the *replay*
half (odd positions) is what `tools build-corpus general` writes for `tools stage ... --replay`; a
model never replays the text it is judged on.
"""
from __future__ import annotations

import os
import pydoc_data.topics
import sys

from tools.artifact import Artifact, Stage
from tools.io import write_jsonl
from tools.stages import CORPUS_GENERAL

LICENSE = "PSF-2.0 (CPython documentation)"
SOURCE = "pydoc_data.topics"
PARTS = ("heldout", "replay")


def topics(part: str) -> list[tuple[str, str]]:
    """(topic, text) pairs of one half, in key order."""
    if part not in PARTS:
        raise ValueError(f"part is one of {PARTS}")
    pages = sorted(pydoc_data.topics.topics.items())
    return [(k, v.strip()) for i, (k, v) in enumerate(pages) if (i % 2 == 0) == (part == "heldout") and v.strip()]


def heldout_text() -> str:
    return "\n\n".join(text for _, text in topics("heldout"))


def build_general(out: str | os.PathLike, *, force: bool = False, log=None) -> Artifact:
    """`tools build-corpus general`: the replay half as a completion corpus ({id, text, source})."""
    params = {"source": SOURCE, "part": "replay", "python": ".".join(map(str, sys.version_info[:2]))}
    with Stage(CORPUS_GENERAL, out, params, force=force, log=log) as st:
        if st.skipped:
            return st.result
        rows = [{"id": f"pydoc-{k}", "text": text, "source": SOURCE} for k, text in topics("replay")]
        write_jsonl(st.path("corpus.jsonl"), rows)
        st.lineage.licenses.add(LICENSE)
        st.lineage.sources.add(SOURCE)
        st.extra.update({"stats": {"documents": len(rows), "chars": sum(len(r["text"]) for r in rows)}})
    return st.result
