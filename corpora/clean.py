"""Text cleaning shared by the corpus builders: de-identification placeholders, clinical sections,
whitespace, noise. Pure functions over strings (they run inside worker processes)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tools.errors import UserError

# MIMIC de-identification placeholders: "[**2151-7-16**]", "[**Known lastname 1234**]".
PLACEHOLDER = re.compile(r"\[\*\*.*?\*\*\]")
_HSPACE = re.compile(r"[^\S\n]+")            # runs of horizontal whitespace (tabs, NBSP, \r...)
_BLANKS = re.compile(r"\n{3,}")               # more than one blank line
_SPACES = re.compile("  +")                   # a run of spaces (one pass, unlike str.replace)


# MIMIC-IV-Note writes every de-identified span as three underscores ("Mr. ___ is a ___ yo man");
# a longer run is adjacent placeholders or a rule line: one placeholder either way.
DEID_UNDERSCORES = re.compile(r"_{3,}")


def remove_placeholders(text: str, replacement: str = "") -> tuple[str, int]:
    """Remove ``[** ... **]`` placeholders; return the text and how many were removed."""
    if "[**" not in text:
        return text, 0
    return PLACEHOLDER.subn(replacement, text)


def remove_deid_underscores(text: str, replacement: str = "") -> tuple[str, int]:
    """Remove MIMIC-IV's ``___`` placeholders; return the text and how many were removed."""
    if "___" not in text:
        return text, 0
    return DEID_UNDERSCORES.subn(replacement, text)


# Whitespace as ``str.split()`` sees it (Unicode White_Space), less the space and the newline
# (tests/corpora/test_corpora_fastpath.py checks this list against ``str.isspace`` over all code points).
_ODD_WS = ("\t\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
           "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_ODD_WS_ASCII = "".join(c for c in _ODD_WS if c.isascii())


def squeeze_lines(text: str) -> str:
    """Every line as ``" ".join(line.split())`` would write it (one space between words, none at
    either end), newlines kept. Whole-string passes (``str.replace``, ``str.strip`` mapped over the
    lines, one regex for runs of spaces): no Python bytecode per line or per word, 2-3x faster than
    split/join on clinical notes (the MIMIC build's hot path)."""
    for c in _ODD_WS_ASCII if text.isascii() else _ODD_WS:
        if c in text:
            text = text.replace(c, " ")
    text = "\n".join(map(str.strip, text.split("\n")))
    if "  " in text:
        text = _SPACES.sub(" ", text)
    return text


def collapse_blank_lines(text: str) -> str:
    """At most one blank line in a row (lines already squeezed)."""
    return _BLANKS.sub("\n\n", text) if "\n\n\n" in text else text


def normalize_whitespace(text: str) -> str:
    """One space between words, no trailing spaces, at most one blank line, stripped."""
    return collapse_blank_lines(squeeze_lines(text).strip("\n"))


# --------------------------------------------------------------------------------------------
# Clinical sections. A section starts at a line that begins with a known header, followed by a
# colon (content may follow on the same line: "Allergies: Penicillin") or alone on its line
# ("HISTORY OF PRESENT ILLNESS"). Known headers that are not kept still end the section before.

# canonical name -> header spellings (matched case-insensitively)
SECTION_HEADERS: dict[str, list[str]] = {
    # kept by default
    "history of present illness": ["history of present illness", "history of the present illness",
                                   "present illness", "hpi"],
    "past medical history": ["past medical history", "past medical/surgical history", "pmh",
                             "past history", "past surgical history", "pmhx"],
    "medications": ["medications on admission", "admission medications", "discharge medications",
                    "medications at discharge", "home medications", "current medications",
                    "meds on admission", "outpatient medications", "medications"],
    "pertinent results": ["pertinent results", "laboratory data", "laboratory results", "lab results",
                          "labs on admission", "admission labs", "discharge labs", "labs", "results",
                          "studies", "imaging"],
    "hospital course": ["brief hospital course", "hospital course", "course in hospital",
                        "summary of hospital course"],
    "discharge diagnosis": ["discharge diagnosis", "discharge diagnoses", "final diagnosis",
                            "final diagnoses", "primary diagnosis", "secondary diagnosis"],
    "assessment and plan": ["assessment and plan", "assessment/plan", "impression and plan",
                            "impression", "assessment", "a/p", "plan"],
    "findings": ["findings"],                    # radiology reports (MIMIC-IV-Note radiology)
    # known, not kept by default (they end the section before them)
    "chief complaint": ["chief complaint", "cc"],
    "allergies": ["allergies", "allergy"],
    "social history": ["social history", "social hx"],
    "family history": ["family history", "family hx"],
    "review of systems": ["review of systems", "ros"],
    "physical exam": ["physical examination", "physical exam", "exam", "vitals reviewed", "vitals",
                      "vital signs"],
    "procedures": ["major surgical or invasive procedure", "procedures", "procedure"],
    "discharge condition": ["discharge condition", "condition at discharge"],
    "discharge instructions": ["discharge instructions", "instructions"],
    "followup": ["followup instructions", "follow-up instructions", "follow up", "followup"],
    "discharge disposition": ["discharge disposition", "disposition", "facility"],
    "administrative": ["admission date", "discharge date", "date of birth", "sex", "service",
                       "attending", "dictated by", "completed by", "addendum", "code status"],
    # radiology report headers (MIMIC-IV-Note radiology): known, not kept by default
    "indication": ["indication", "clinical indication", "reason for exam", "reason for examination",
                   "clinical history"],
    "technique": ["technique", "comparison", "comparisons", "examination", "exam type"],
}
DEFAULT_KEEP = ["history of present illness", "past medical history", "medications", "pertinent results",
                "hospital course", "discharge diagnosis", "assessment and plan", "findings"]


def _trie_pattern(words) -> str:
    """A regex that matches exactly one of ``words`` (lowercase, single spaces; a space matches
    any run of horizontal whitespace), written as a trie of nested groups."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}                                   # a word ends here

    def walk(node: dict) -> str:
        alts = [(r"[^\S\n]+" if ch == " " else re.escape(ch)) + walk(child)
                for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body   # greedy: the longest spelling first

    return walk(trie)


@dataclass
class SectionFilter:
    """Which sections to keep, and the compiled header matcher (picklable: rebuilt lazily)."""

    keep: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP))
    headers: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in SECTION_HEADERS.items()})

    def __post_init__(self):
        self._spelling_to_name: dict[str, str] = {}
        for name, spellings in self.headers.items():
            for s in [name, *spellings]:
                key = " ".join(s.lower().split())
                if key:
                    self._spelling_to_name.setdefault(key, name)
        self._keep = {self._spelling_to_name.get(k.lower(), k.lower()) for k in self.keep}
        # A header line: a known spelling (any whitespace between its words) at the start of a line,
        # then only horizontal whitespace before a colon or the end of the line. One regex finds them
        # all: it starts with a literal newline (the engine skips to each line start at C speed) and
        # holds the spellings as a trie (one character tested per step, not every spelling).
        pattern = r"\n[^\S\n]*(%s)[^\S\n]*(?=[:\n])" % _trie_pattern(self._spelling_to_name)
        self._header_re = re.compile(pattern, re.IGNORECASE)
        self._header_re_lower = re.compile(pattern)   # on ASCII text lowered first: 3x faster

    def __getstate__(self):
        return {"keep": self.keep, "headers": self.headers}

    def __setstate__(self, state):
        self.keep, self.headers = state["keep"], state["headers"]
        self.__post_init__()

    def extract(self, text: str) -> tuple[str, list[str]]:
        """The kept sections (header line included), whitespace-normalised, separated by one blank
        line; and the names of the sections kept. A section runs from its header line to the next
        known header (kept or not); a header with nothing under it (nor after its colon) is dropped.

        Hot path of the MIMIC build: the regex finds the header lines, then each kept section is
        normalised by whole-string passes (squeeze_lines): no Python loop over lines."""
        padded = "\n" + squeeze_lines(text) + "\n"   # the whole note at once: one call, not one per section
        get = self._spelling_to_name.get
        heads = []                      # (start of the header line, end of that line, name)
        if padded.isascii():     # lower() keeps every offset: search the lowered copy
            found = self._header_re_lower.finditer(padded.lower())
        else:
            found = self._header_re.finditer(padded)
        for m in found:
            g = m.group(1)
            name = get(g) or get(" ".join(g.split()).lower())
            if name is None:            # a spelling whose case-folding regex and lower() disagree
                continue
            heads.append((m.start() + 1, m.end(), name))
        if not heads:
            return "", []
        keep = self._keep
        sections: list[str] = []
        names: list[str] = []
        ends = [h[0] - 1 for h in heads[1:]] + [len(padded)]
        for (start, after, name), end in zip(heads, ends):
            if name not in keep:
                continue
            sec = padded[start:end].rstrip("\n")
            if "\n" not in sec and not sec[after - start + 1:].strip():
                continue                # a header with nothing under it (nor after it) is no section
            sections.append(sec)
            names.append(name)
        return collapse_blank_lines("\n\n".join(sections)), names


def load_section_filter(path: str | Path | None) -> SectionFilter:
    """The default filter, or one read from YAML: ``keep: [names]`` and optional
    ``headers: {name: [spellings]}`` (added to the known headers)."""
    if path is None:
        return SectionFilter()
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError("sections file not found", path=str(p))
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError("sections file is not UTF-8", path=str(p)) from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise UserError(f"malformed YAML ({getattr(e, 'problem', e)})", path=str(p),
                        line=None if line is None else line + 1) from None
    if not isinstance(doc, dict):
        raise UserError("expected a mapping with a 'keep' list", path=str(p))
    unknown = sorted(set(doc) - {"keep", "headers"})
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} (allowed: keep, headers)", path=str(p), field=unknown[0])
    keep = doc.get("keep")
    if not isinstance(keep, list) or not keep or not all(isinstance(k, str) and k.strip() for k in keep):
        raise UserError("'keep' must be a non-empty list of section names", path=str(p), field="keep")
    headers = {k: list(v) for k, v in SECTION_HEADERS.items()}
    extra = doc.get("headers") or {}
    if not isinstance(extra, dict):
        raise UserError("'headers' must map a section name to a list of spellings", path=str(p), field="headers")
    for name, spellings in extra.items():
        if not isinstance(spellings, list) or not all(isinstance(s, str) and s.strip() for s in spellings):
            raise UserError(f"headers.{name} must be a list of strings", path=str(p), field=f"headers.{name}")
        headers.setdefault(str(name).lower(), []).extend(s.strip() for s in spellings)
    known = {s.lower() for n, sp in headers.items() for s in [n, *sp]}
    for k in keep:  # a kept name nobody knows becomes a header of its own
        if k.strip().lower() not in known:
            headers[k.strip().lower()] = [k.strip()]
    return SectionFilter(keep=[k.strip() for k in keep], headers=headers)


# --------------------------------------------------------------------------------------------
# Textbook noise.
_NOISE = re.compile(r"[^\w\s.,;:!?'\"()\[\]{}%/+\-–—=<>°±×&*#@$]+")
_ALNUM = re.compile(r"[^\W_]")


def strip_noise(line: str) -> str:
    """Replace characters that are neither word characters nor ordinary punctuation by a space."""
    return _HSPACE.sub(" ", _NOISE.sub(" ", line)).strip()


def has_alnum(line: str) -> bool:
    return _ALNUM.search(line) is not None
