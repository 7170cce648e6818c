"""One MIMIC note row -> one JSON line: the columns and versions of MIMIC-III NOTEEVENTS and
MIMIC-IV-Note, ``NoteOptions``, the cleaning rules (``clean_note``), the source names and the hashes
that find duplicates."""
from __future__ import annotations

import hashlib
import json
import json.encoder
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from tools.errors import UserError

from ..clean import SectionFilter, normalize_whitespace, remove_deid_underscores, remove_placeholders

COLUMNS = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
           "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
REQUIRED = ("ROW_ID", "CATEGORY", "ISERROR", "TEXT")
# MIMIC-IV-Note (discharge.csv.gz, radiology.csv.gz; schema mimiciv_note)
COLUMNS_IV = ["NOTE_ID", "SUBJECT_ID", "HADM_ID", "NOTE_TYPE", "NOTE_SEQ", "CHARTTIME", "STORETIME", "TEXT"]
REQUIRED_IV = ("NOTE_ID", "TEXT")              # NOTE_TYPE is read when present
# (id, category, error flag, text) columns of each version; None: the version has no such column
WANT = {"iii": ("ROW_ID", "CATEGORY", "ISERROR", "TEXT"), "iv": ("NOTE_ID", "NOTE_TYPE", None, "TEXT")}
VERSIONS = ("auto", "iii", "iv")
DEFAULT_TABLES = {"iii": ("mimiciii", "noteevents"), "iv": ("mimiciv_note", "discharge")}
NOTE_TYPES_IV = {"ds": "discharge", "ad": "discharge_addendum", "rr": "radiology", "ar": "radiology_addendum"}
LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
SOURCE = "MIMIC-III v1.4 NOTEEVENTS"
SOURCE_IV = "MIMIC-IV-Note (discharge/radiology)"


def check_version(version: str) -> None:
    """Refuse a ``--version`` that is not one of VERSIONS."""
    if version not in VERSIONS:
        raise UserError(f"unknown MIMIC version {version!r} (one of {', '.join(VERSIONS)})", field="--version")


@dataclass
class NoteOptions:
    categories: tuple[str, ...] = ()            # empty: every category (compared stripped, casefolded)
    drop_errors: bool = True
    sections: SectionFilter | None = field(default_factory=SectionFilter)
    placeholder: str = ""
    min_chars: int = 200

    def params(self) -> dict:
        return {"categories": sorted(self.categories), "drop_errors": self.drop_errors,
                "sections": None if self.sections is None else {
                    "keep": sorted(self.sections.keep),
                    "headers_sha256": hashlib.sha256(
                        json.dumps(self.sections.headers, sort_keys=True).encode()).hexdigest()},
                "placeholder": self.placeholder, "min_chars": self.min_chars}


_enc = json.encoder.encode_basestring  # C: a JSON string literal, non-ASCII kept
# what encode_basestring escapes, less the newline
_JSON_SPECIAL = '"\\' + "".join(chr(i) for i in range(32) if i != 10)


def json_string(text: str) -> str:
    """``encode_basestring(text)``, 4x faster on clinical text: when nothing but newlines needs an
    escape (checked with memchr-speed ``in``), one ``str.replace`` writes the literal."""
    for c in _JSON_SPECIAL:
        if c in text:
            return _enc(text)
    return '"' + text.replace("\n", "\\n") + '"'


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@lru_cache(maxsize=1024)
def category_source(category: str) -> str:
    return "mimic-iii/noteevents/" + (category.strip().lower().replace(" ", "_").replace("/", "_") or "none")


@lru_cache(maxsize=64)
def note_type_source(note_type: str) -> str:
    t = note_type.strip().lower()
    return "mimic-iv/note/" + NOTE_TYPES_IV.get(t, t.replace(" ", "_").replace("/", "_") or "none")


def _iv_category_wanted(cat: str, wanted) -> bool:
    """A MIMIC-IV note type matches --category by its code (DS, RR...) or its name (discharge...)."""
    c = cat.casefold()
    return c in wanted or NOTE_TYPES_IV.get(c) in wanted


def id_hash(note_id: str) -> int:
    """The id as a 64-bit number for the duplicate-id check (the ids stay in the workers). Python's
    string hash: 20x cheaper than blake2b; the main process and its forked workers share its seed."""
    return hash(note_id)


def clean_note(row_id, category, iserror, text, opts: NoteOptions, stats: Counter,
               version: str = "iii") -> tuple[int, str, int, int] | None:
    """One note row -> (hash of the text, JSON line, length, hash of the id), or None when dropped
    (counted). MIMIC-III and MIMIC-IV rows share the rules; they differ in the de-identification
    marks ([** ... **] / ___), the id and the source name."""
    stats["rows"] += 1
    cat = (category or "").strip()
    iv = version == "iv"
    if opts.categories and not (_iv_category_wanted(cat, opts.categories) if iv else cat.casefold() in opts.categories):
        stats["dropped_category"] += 1
        return None
    if opts.drop_errors and (iserror or "").strip() == "1":
        stats["dropped_iserror"] += 1
        return None
    # placeholders first (so "Mr. [**Known lastname 1**] is" becomes "Mr. is"), then one pass over
    # the lines: sections and whitespace ("\r" is whitespace to str.split)
    if iv:
        text, n = remove_deid_underscores(text or "", opts.placeholder)
    else:
        text, n = remove_placeholders(text or "", opts.placeholder)
    stats["placeholders_removed"] += n
    if opts.sections is not None:
        text, names = opts.sections.extract(text)
        if not names:
            stats["dropped_no_sections"] += 1
            return None
    else:
        text = normalize_whitespace(text)
    if len(text) < opts.min_chars:
        stats["dropped_short"] += 1
        return None
    rid = str(row_id).strip()
    # the same bytes as json.dumps({...}, sort_keys=True, ensure_ascii=False), without the dict
    line = (f'{{"id": {_enc(("mimic-iv-" if iv else "mimic-") + rid)}, '
            f'"source": {_enc(note_type_source(cat) if iv else category_source(cat))}, '
            f'"text": {json_string(text)}}}')
    return text_hash(text), line, len(text), id_hash(rid)
