"""The MIMIC build's hot path is written for speed (whole-string passes, one regex for headers, a
JSON fast path, duplicates dropped by byte ranges). Each fast piece is checked here against the
plain, obviously-correct formulation on random inputs, so a speed-up can never change the corpus."""
from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from corpora.clean import SectionFilter, normalize_whitespace, squeeze_lines
from corpora.mimic import SPOOL_PREFIX, NoteOptions, build, csv_tasks, json_string, spool_dir


def reference_extract(sf: SectionFilter, text: str) -> tuple[str, list[str]]:
    """Sections the slow way: line by line, each line split into words (the former implementation)."""
    def header(raw: str):
        i = raw.find(":")
        key = raw[:i] if i >= 0 else raw
        return sf._spelling_to_name.get(" ".join(key.split()).lower())

    out, names, keeping, start, has_body = [], [], False, 0, False
    for raw in text.split("\n"):
        name = header(raw)
        if name is not None:
            if keeping and not has_body:
                del out[start:]
                names.pop()
            keeping = name in sf._keep
            if keeping:
                while out and not out[-1]:
                    out.pop()
                if out:
                    out.append("")
                start = len(out)
                line = " ".join(raw.split())
                has_body = bool(line.split(":", 1)[1].strip()) if ":" in line else False
                out.append(line)
                names.append(name)
            continue
        if not keeping:
            continue
        line = " ".join(raw.split())
        if line:
            has_body = True
            out.append(line)
        elif out and out[-1]:
            out.append("")
    if keeping and not has_body:
        del out[start:]
        names.pop()
    while out and not out[-1]:
        out.pop()
    return "\n".join(out), names


HEADS = ["HPI", "History of Present Illness", "past  medical\thistory", "Allergies", "LABS", "Labs on admission",
         "Hospital Course", "Plan", "a/p", "Family History", "discharge diagnosis", "Impression", "Medications"]
PIECES = ["", " ", "  ", "\t", "\r", "\xa0", "\u2003", "\x0b", "words here", "two  spaces", ":", "a: b", "é ü",
          "x", '"quoted"', "back\\slash", "\x00", "\x1f"]


def random_note(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 14)):
        if rng.random() < 0.35:
            h = rng.choice(HEADS)
            h = h.upper() if rng.random() < 0.3 else h
            lines.append(rng.choice(["", " ", "\t"]) + h + rng.choice(["", " ", "\t"])
                         + rng.choice([":", ":", "", ": " + rng.choice(PIECES), ": :"]) + rng.choice(["", "\r"]))
        else:
            lines.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 5))))
    return "\n".join(lines)


def test_whitespace_table_is_str_split_whitespace():
    from corpora.clean import _ODD_WS
    assert set(_ODD_WS) == {c for c in map(chr, range(0x110000)) if c.isspace()} - {" ", "\n"}


def test_squeeze_and_normalize_equal_split_join():
    rng = random.Random(7)
    for _ in range(3000):
        text = random_note(rng)
        want = "\n".join(" ".join(line.split()) for line in text.split("\n"))
        assert squeeze_lines(text) == want, repr(text)
        lines = [x for x in want.split("\n")]
        blocks, prev = [], None
        for x in lines:           # at most one blank line in a row, none at the ends
            if x or prev:
                blocks.append(x)
            prev = x
        while blocks and not blocks[-1]:
            blocks.pop()
        assert normalize_whitespace(text) == "\n".join(blocks), repr(text)


def test_section_extraction_equals_line_by_line_reference():
    rng = random.Random(3)
    for sf in (SectionFilter(), SectionFilter(keep=["labs", "allergies", "plan"])):
        for _ in range(4000):
            text = random_note(rng)
            assert sf.extract(text) == reference_extract(sf, text), repr(text)


def test_section_extraction_on_real_synthetic_notes(demo_notes_csv):
    from corpora.clean import remove_placeholders

    sf = SectionFilter()
    path = demo_notes_csv
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as f:
        texts = [remove_placeholders(r["TEXT"])[0] for r in csv.DictReader(f)]
    assert len(texts) > 100
    kept = 0
    for t in texts:
        got = sf.extract(t)
        assert got == reference_extract(sf, t)
        kept += bool(got[1])
    assert kept > len(texts) // 2        # the notes do have the sections we keep


def test_json_fast_path_equals_encoder():
    enc = json.encoder.encode_basestring
    rng = random.Random(11)
    alphabet = ["a", " ", "\n", '"', "\\", "\t", "\x00", "\x1f", "é", "\u2028", "\x7f", "\r", "\ud800"]
    for _ in range(20000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert json_string(s) == enc(s), repr(s)
    assert json.loads(json_string("line one\nline two")) == "line one\nline two"


def _write_notes(path: Path, n: int, rng: random.Random) -> None:
    body = ("History of Present Illness:\n{w} presents with  dyspnea [**Name 12**] for {d} days.\n\n"
            "Past Medical History:\nCHF, \"AF\", on warfarin, é.\nSocial History:\nlives alone\n")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
                    "DESCRIPTION", "CGID", "ISERROR", "TEXT"])
        last = None
        for i in range(1, n + 1):
            if last is not None and rng.random() < 0.15:
                text = last                        # a duplicate, next to or far from its first copy
            else:
                text = body.format(w=rng.choice(["Pt", "Mr. X", "She"]) * rng.randint(1, 30), d=i)
            if rng.random() < 0.3:
                last = text
            w.writerow([i, 1, 2, "", "", "", "Discharge summary ", "", "", "", text])


@pytest.mark.parametrize("workers", [1, 2])
def test_duplicates_dropped_by_byte_range_across_blocks(tmp_path, workers):
    """Tiny blocks: duplicates fall inside a block and across blocks and workers; the corpus must be
    the one a single pass with one big block writes, and no spool may be left behind."""
    rng = random.Random(5)
    src = tmp_path / "notes.csv"
    _write_notes(src, 600, rng)
    opts = NoteOptions(min_chars=20)
    ref, got = tmp_path / "ref.jsonl", tmp_path / "got.jsonl"
    s_ref = build(csv_tasks(src), ref, opts, 1, str(src))
    s_got = build(csv_tasks(src, block=8 << 10), got, opts, workers, str(src))
    assert got.read_bytes() == ref.read_bytes()
    assert s_got == s_ref and s_ref["dropped_duplicate"] > 20
    texts = [json.loads(x)["text"] for x in ref.read_text(encoding="utf-8").splitlines()]
    assert len(texts) == len(set(texts)) == s_ref["kept"]
    assert sum(s_ref["length_log2_histogram"].values()) == s_ref["kept"]
    for where in (Path("/dev/shm"), tmp_path):       # spool_dir puts it in one of the two
        assert not list(where.glob(f"{SPOOL_PREFIX}{os.getpid()}-*"))


def test_spool_is_private_and_stale_spools_are_removed(tmp_path):
    dead = 2 ** 22 + 12345     # above the default pid_max: no such process
    base = Path(spool_dir(tmp_path)).parent
    stale = base / f"{SPOOL_PREFIX}{dead}-old"
    stale.mkdir()
    (stale / "1.part").write_text("credentialed text")
    fresh = Path(spool_dir(tmp_path))
    try:
        assert not stale.exists()
        assert fresh.stat().st_mode & 0o777 == 0o700
    finally:
        for p in base.glob(f"{SPOOL_PREFIX}{os.getpid()}-*"):
            p.rmdir()


def test_stats_count_every_row(tmp_path):
    rng = random.Random(9)
    src = tmp_path / "notes.csv"
    _write_notes(src, 200, rng)
    stats = build(csv_tasks(src, block=4 << 10), tmp_path / "o.jsonl", NoteOptions(min_chars=20), 2, str(src))
    dropped = Counter({k: v for k, v in stats.items() if k.startswith("dropped_")})
    assert stats["rows"] == 200 == stats["kept"] + sum(dropped.values())
