"""Find training items that share word n-grams with benchmark test items; report, optionally clean.

Benchmarks: ``pubmedqa`` (the 500 official test ids; also matched by PMID), ``medqa`` (test),
``mmlu-medical`` (the nine subjects' test CSVs), or any path: a benchmark JSONL
(``{"id", "question", "context", "options", ...}``) or a corpus/dataset artifact folder.
Text is lower-cased and split on non-alphanumerics; n-grams are compared as whole word tuples.
"""
from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tools.artifact import Stage, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl, write_json, write_jsonl
from tools.paths import bundled_data
from tools.progress import progress
from tools.stages import DATA_FAMILIES

from .sft import pubmedqa_test_ids

BUILTIN = ("pubmedqa", "medqa", "mmlu-medical")
_WORD = re.compile(r"[a-z0-9]+")
REPORT_CAP = 1000  # items listed in the manifest (the report file has them all)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_keys(ws: list[str], n: int):
    for i in range(len(ws) - n + 1):
        yield hash(" ".join(ws[i:i + n]))


def _flatten(v) -> str:
    if isinstance(v, dict):
        return "\n".join(_flatten(x) for x in v.values())
    if isinstance(v, list):
        return "\n".join(_flatten(x) for x in v)
    return "" if v is None else str(v)


def row_text(row: dict) -> str:
    """What a training row says (system prompts excluded: they are shared boilerplate)."""
    if "messages" in row:
        return "\n".join(str(m.get("content", "")) for m in row["messages"] if m.get("role") != "system")
    if "text" in row:
        return str(row["text"])
    return "\n".join(_flatten(row.get(k)) for k in ("question", "context", "options", "QUESTION", "CONTEXTS"))


# -- benchmarks ---------------------------------------------------------------------------------
def benchmark_items(spec: str) -> tuple[str, list[tuple[str, str]], list[Path]]:
    """(name, [(item id, text)], input files or artifact folders) for a built-in name or a path."""
    data = bundled_data()
    if spec == "pubmedqa":
        f = data / "pubmedqa" / "test.jsonl"
        return spec, [(f"pubmedqa:{o['id']}", "\n".join([o["QUESTION"], *o["CONTEXTS"], o.get("LONG_ANSWER", "")]))
                      for o in read_jsonl(f, required=("id", "QUESTION", "CONTEXTS"))], [f]
    if spec == "medqa":
        f = data / "medqa" / "test.jsonl"
        return spec, [(f"medqa-test:{i}", o["question"] + "\n" + _flatten(o["options"]))
                      for i, o in enumerate(read_jsonl(f, required=("question", "options")), 1)], [f]
    if spec == "mmlu-medical":
        d = data / "mmlu_medical" / "test"
        items, files = [], sorted(d.glob("*_test.csv"))
        for f in files:
            with open(f, encoding="utf-8", newline="") as fh:
                for i, row in enumerate(csv.reader(fh), 1):
                    items.append((f"mmlu:{f.stem[:-5]}:{i}", "\n".join(row[:5])))
        return spec, items, files
    p = Path(spec)
    if p.is_dir():
        art = read_artifact(p)
        items = []
        for name in sorted(art.outputs()):
            if name.endswith(".jsonl"):
                for i, o in enumerate(read_jsonl(p / name), 1):
                    items.append((f"{p.name}/{name}:{o.get('id', i)}", row_text(o)))
        return p.name, items, [p]
    if p.is_file():
        return p.stem, [(f"{p.stem}:{o.get('id', i)}", row_text(o)) for i, o in enumerate(read_jsonl(p), 1)], [p]
    raise UserError(f"unknown benchmark (use {', '.join(BUILTIN)}, a JSONL file or an artifact folder)",
                    field="--against", path=spec)


class NgramIndex:
    """Benchmark n-grams -> the items holding them, and each item's number of distinct n-grams."""

    def __init__(self, n: int):
        self.n = n
        self.index: dict[int, list[str]] = {}
        self.size: dict[str, int] = {}
        self.stats: dict[str, dict] = {}
        self.owner: dict[str, str] = {}

    def add(self, name: str, items: list[tuple[str, str]]) -> None:
        too_short = ngrams = 0
        for iid, text in items:
            self.owner[iid] = name
            grams = set(ngram_keys(words(text), self.n))
            if not grams:
                too_short += 1
                continue
            self.size[iid] = len(grams)
            for h in grams:
                lst = self.index.setdefault(h, [])
                if len(lst) < 64:  # boilerplate n-grams shared by many items need no more owners
                    lst.append(iid)
            ngrams += len(grams)
        self.stats[name] = {"items": len(items), "ngrams": ngrams, "too_short": too_short}

    def match(self, text: str) -> list[tuple[str, int, float]]:
        """[(benchmark item, shared n-grams, share of that item's n-grams)], best first."""
        shared: Counter = Counter()
        for h in set(ngram_keys(words(text), self.n)):
            got = self.index.get(h)
            if got:
                shared.update(got)
        out = [(i, c, c / self.size[i]) for i, c in shared.items()]
        out.sort(key=lambda t: (-t[2], -t[1], t[0]))
        return out


@dataclass(frozen=True)
class DecontamSpec:
    """The benchmarks to check against, the n-gram size and the thresholds; ``write_clean`` writes a cleaned copy."""

    against: tuple = BUILTIN
    ngram: int = 13
    min_coverage: float = 0.2
    min_shared: int | None = None
    write_clean: bool = False


def decontaminate(train, out, spec: DecontamSpec | None = None, *, force: bool = False, log=None, **fields):
    """``decontaminate(train, out, spec)`` or ``(train, out, **DecontamSpec fields)``. Flag a training item
    when it holds at least ``min_coverage`` of some benchmark item's
    distinct n-grams (a copied question, even inside a long document), or, if ``min_shared`` is
    given, when it shares at least that many n-grams with one item. Coverage rather than a bare
    count because exam vignettes share boilerplate: MedQA dev and test share a 13-gram in 29 % of
    the items (vital signs), yet no dev item covers more than a third of any test item."""
    spec = spec or DecontamSpec(**fields)
    against, ngram, min_coverage, min_shared, write_clean = (spec.against, spec.ngram, spec.min_coverage,
                                                               spec.min_shared, spec.write_clean)
    if ngram < 3:
        raise UserError("--ngram must be at least 3", field="--ngram")
    art = read_artifact(train, stage=DATA_FAMILIES)
    if Path(out).resolve() == art.path.resolve():
        raise UserError("--out must differ from --train", field="--out")
    files = [n for n in ("train.jsonl", "validation.jsonl", "test.jsonl", "corpus.jsonl") if n in art.outputs()]
    if not files:
        raise UserError("artifact holds no train/validation/test/corpus JSONL", path=str(art.path))
    benches = [benchmark_items(s) for s in dict.fromkeys(against)]
    inputs = [art.path] + [p for _, _, paths in benches for p in paths]
    if not 0 < min_coverage <= 1:
        raise UserError("--min-coverage must be in (0, 1]", field="--min-coverage")
    params = {"against": list(dict.fromkeys(against)), "ngram": ngram, "min_coverage": min_coverage,
              "min_shared": min_shared,
              "write_clean": write_clean}
    name = art.stage if write_clean else "decontaminate"
    with Stage(name, out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        idx = NgramIndex(ngram)
        for bname, items, _ in benches:
            idx.add(bname, items)
        test_pmids = set()
        if "pubmedqa" in against:
            test_pmids = set(pubmedqa_test_ids())
        flagged, per_bench, total = [], Counter(), 0
        kept: dict[str, list] = defaultdict(list)
        for fname in files:
            path = art.path / fname
            rows = list(read_jsonl(path, required=("id",)))
            with progress(f"decontaminate {fname}", total=len(rows), unit="items") as adv:
                for row in rows:
                    total += 1
                    m = idx.match(row_text(row))
                    hit = [t for t in m if t[2] >= min_coverage or (min_shared and t[1] >= min_shared)]
                    reasons = []
                    if hit:
                        reasons.append(f"covers {hit[0][2]:.0%} of {hit[0][0]} ({hit[0][1]} shared {ngram}-grams)")
                    pmid = str((row.get("meta") or {}).get("pmid") or "")
                    if pmid and pmid in test_pmids:
                        reasons.append("PubMedQA test id")
                        hit = [(f"pubmedqa:{pmid}", 0, 1.0)] + [t for t in hit if t[0] != f"pubmedqa:{pmid}"]
                    if reasons:
                        per_bench.update(sorted({idx.owner.get(t[0], "pubmedqa") for t in hit}))
                        flagged.append({"file": fname, "id": row["id"], "reasons": reasons,
                                        "matches": [{"item": i, "shared": c, "coverage": round(f, 4)}
                                                    for i, c, f in hit[:10]]})
                    else:
                        kept[fname].append(row)
                    adv(1)
        report = {"ngram": ngram, "min_coverage": min_coverage, "min_shared": min_shared, "benchmarks": idx.stats,
                  "train": str(art.path), "train_items": total, "flagged": len(flagged),
                  "per_benchmark": dict(sorted(per_bench.items())),
                  "items": flagged}
        if write_clean:
            for fname in files:
                write_jsonl(st.path(fname), kept[fname])
            write_json(st.path("decontamination.json"), report)
        else:
            write_json(st.path("report.json"), report)
        st.extra["decontamination"] = {**{k: v for k, v in report.items() if k != "items"},
                                       "items": flagged[:REPORT_CAP], "items_truncated": len(flagged) > REPORT_CAP}
    return st.result
