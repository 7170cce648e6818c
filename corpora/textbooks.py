"""USMLE textbook .txt files -> completion corpus: drop blank lines, strip non-alphanumeric noise,
join lines shorter than 5 tokens to the next line, cut into documents of about N words. A line
longer than a document (a book extracted without line breaks) is cut at word boundaries: no
document holds more than twice ``doc_words`` words, and memory stays bounded however long a line is."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tools.artifact import Stage
from tools.errors import UserError
from tools.progress import log, progress

from .canaries import CanarySpec, plant_in_stage
from .clean import has_alnum, strip_noise

DEFAULT_LICENSE = "user-supplied textbooks (rights not checked: keep private unless you hold them)"
PIECE = 1 << 20     # bytes: a longer line is read in pieces cut at a space


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (byte 0x{raw[e.start]:02x})", path=str(path), line=n) from None


def _cut(buf: bytes) -> int:
    """Where to cut a piece of a long line: after its last space or tab, else before the last
    (possibly incomplete) UTF-8 character."""
    cut = max(buf.rfind(b" "), buf.rfind(b"\t")) + 1
    if cut > 0:
        return cut
    cut = len(buf)
    while cut > 0 and buf[cut - 1] & 0xC0 == 0x80:    # continuation bytes
        cut -= 1
    if cut > 0 and buf[cut - 1] >= 0xC0:              # the lead byte of that character
        cut -= 1
    return cut or len(buf)


def read_lines(path: Path, piece: int = PIECE) -> Iterator[tuple[int, str]]:
    """(line number, line) with strict UTF-8: a bad byte names file:line. A line longer than
    ``piece`` bytes comes in pieces (same line number), each cut at a space."""
    with open(path, "rb") as f:
        n, carry = 1, b""
        while True:
            raw = f.readline(piece)
            if not raw and not carry:
                return
            buf, carry = carry + raw, b""
            if not raw or buf.endswith(b"\n"):
                yield n, _decode(buf, path, n)
                n += 1
                continue
            cut = _cut(buf)
            yield n, _decode(buf[:cut], path, n)
            carry = buf[cut:]


def clean_lines(lines, min_tokens: int = 5) -> Iterator[str]:
    """Noise stripped, blank and symbol-only lines dropped, short lines joined to the next one."""
    pending = ""
    for line in lines:
        line = strip_noise(line.lstrip("\ufeff"))
        if not line or not has_alnum(line):
            continue
        line = f"{pending} {line}" if pending else line
        if len(line.split()) < min_tokens:
            pending = line
            continue
        pending = ""
        yield line
    if pending:
        yield pending


def documents(lines, doc_words: int = 512) -> Iterator[str]:
    """Consecutive lines grouped until a document holds at least ``doc_words`` words; a line of
    more than ``doc_words`` words is first cut into pieces of ``doc_words`` words."""
    buf, words = [], 0
    for line in lines:
        ws = line.split()
        if len(ws) > doc_words:
            pieces = [(" ".join(ws[i:i + doc_words]), min(doc_words, len(ws) - i)) for i in range(0, len(ws), doc_words)]
        else:
            pieces = [(line, len(ws))]
        for text, n in pieces:
            buf.append(text)
            words += n
            if words >= doc_words:
                yield "\n".join(buf)
                buf, words = [], 0
    if buf:
        yield "\n".join(buf)


def build_corpus(src, out, *, min_tokens: int = 5, doc_words: int = 512, min_chars: int = 50,
                 license: str = DEFAULT_LICENSE, canaries: CanarySpec | None = None, force: bool = False):
    """The ``corpus.textbooks`` stage (progress and log lines on stderr); returns the Artifact."""
    src = Path(src)
    if not src.is_dir():
        raise UserError("expected a folder of .txt files", path=str(src))
    files = sorted(p for p in src.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError("no .txt files in the folder", path=str(src))
    for p in files:
        if p.stat().st_size == 0:
            raise UserError("text file is empty", path=str(p))
    params = {"min_tokens": min_tokens, "doc_words": doc_words, "min_chars": min_chars, "license": license,
              "files": [p.relative_to(src).as_posix() for p in files]}
    if canaries:
        params["canaries"] = canaries.params()
    with Stage("corpus.textbooks", out, params, inputs=files, force=force, log=log) as st:
        if st.skipped:
            return st.result
        stats = {"files": len(files), "documents": 0, "dropped_short": 0, "words": 0}
        with open(st.path("corpus.jsonl"), "w", encoding="utf-8", newline="\n") as f, \
                progress("textbooks", total=len(files), unit="files") as adv:
            for p in files:
                rel = p.relative_to(src).as_posix()
                stem = rel[:-4].replace("/", "_")
                lines = (line for _, line in read_lines(p))
                n = 0
                for doc in documents(clean_lines(lines, min_tokens), doc_words):
                    if len(doc) < min_chars:
                        stats["dropped_short"] += 1
                        continue
                    f.write(json.dumps({"id": f"textbook-{stem}-{n:05d}", "source": f"textbook/{rel}",
                                        "text": doc}, ensure_ascii=False, sort_keys=True) + "\n")
                    n += 1
                    stats["words"] += len(doc.split())
                stats["documents"] += n
                adv(1)
        if stats["documents"] == 0:
            raise UserError("no document left after cleaning (files hold no text?)", path=str(src))
        st.lineage.licenses.add(license)
        st.lineage.sources.add(f"textbooks: {src.name}")
        st.extra["stats"] = stats
        plant_in_stage(st, canaries, str(src))
    return st.result
