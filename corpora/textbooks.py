"""USMLE textbook .txt files -> completion corpus: drop blank lines, strip non-alphanumeric noise,
join lines shorter than 5 tokens to the next line, cut into documents of about N words."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tools.errors import UserError

from .clean import has_alnum, strip_noise

DEFAULT_LICENSE = "user-supplied textbooks (rights not checked: keep private unless you hold them)"


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) with strict UTF-8: a bad byte names file:line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 (byte 0x{raw[e.start]:02x})", path=str(path), line=n) from None


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
    """Consecutive lines grouped until a document holds at least ``doc_words`` words."""
    buf, words = [], 0
    for line in lines:
        buf.append(line)
        words += len(line.split())
        if words >= doc_words:
            yield "\n".join(buf)
            buf, words = [], 0
    if buf:
        yield "\n".join(buf)


def build_corpus(src, out, *, min_tokens: int = 5, doc_words: int = 512, min_chars: int = 50,
                 license: str = DEFAULT_LICENSE, force: bool = False, log=None):
    from tools.artifact import Stage
    from tools.progress import progress

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
    return st.result
