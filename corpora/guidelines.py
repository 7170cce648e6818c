"""Meditron's clinical guidelines JSONL (epfl-llm/guidelines: id, source, title, clean_text, ...)
-> completion corpus, filtered by source, each kept source's terms recorded in the lineage."""
from __future__ import annotations

import json
from collections import Counter

from tools.artifact import Stage
from tools.errors import UserError
from tools.io import read_jsonl, require_file

from .canaries import CanarySpec, plant_in_stage
from .clean import normalize_whitespace

DATASET_TERMS = "epfl-llm/guidelines: Common Crawl Foundation Terms of Use"
# Source tag -> the terms its articles come under (per the dataset card; check before release).
SOURCE_TERMS = {
    "cco": "Cancer Care Ontario terms of use",
    "cdc": "CDC content: US federal government work (public domain unless noted)",
    "cma": "Canadian Medical Association terms of use",
    "icrc": "ICRC terms of use",
    "nice": "NICE terms and conditions (UK)",
    "pubmed": "PubMed / PMC article license (per article)",
    "spor": "Strategy for Patient-Oriented Research (SPOR) terms of use",
    "who": "WHO terms (typically CC BY-NC-SA 3.0 IGO)",
    "wikidoc": "WikiDoc: CC BY-SA 3.0",
}


def build_corpus(src, out, *, sources: tuple[str, ...] = (), min_chars: int = 200, terms_file=None,
                 canaries: CanarySpec | None = None, force: bool = False, log=None):
    src = require_file(src, "guidelines JSONL")
    wanted = tuple(sorted({s.strip().lower() for s in sources if s.strip()}))
    terms = dict(SOURCE_TERMS)
    if terms_file:
        import yaml
        tf = require_file(terms_file, "terms YAML")
        try:
            extra = yaml.safe_load(tf.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"malformed YAML ({type(e).__name__})", path=str(tf)) from None
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise UserError("expected a mapping source -> license text", path=str(tf))
        terms.update({str(k).lower(): v for k, v in extra.items()})
    params = {"sources": list(wanted), "min_chars": min_chars, "terms": terms}
    if canaries:
        params["canaries"] = canaries.params()
    with Stage("corpus.guidelines", out, params, inputs=[src], force=force, log=log) as st:
        if st.skipped:
            return st.result
        stats: Counter = Counter()
        kept_sources: Counter = Counter()
        seen_ids = set()
        with open(st.path("corpus.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            for n, item in enumerate(read_jsonl(src, required=("source", "clean_text")), 1):
                stats["read"] += 1
                if not isinstance(item["source"], str) or not item["source"].strip():
                    raise UserError("source must be a non-empty string", path=str(src), line=n, field="source")
                source = item["source"].strip().lower()
                if wanted and source not in wanted:
                    stats["dropped_source"] += 1
                    continue
                if not isinstance(item["clean_text"], str):
                    raise UserError("clean_text must be a string", path=str(src), line=n, field="clean_text")
                title = str(item.get("title") or "").strip()
                body = normalize_whitespace(item["clean_text"])
                # the title as a heading, unless the text already opens with it
                text = f"{title}\n\n{body}" if title and body.split("\n", 1)[0].strip() != title else body
                if len(text) < min_chars:
                    stats["dropped_short"] += 1
                    continue
                gid = item.get("id")
                gid = f"line{n}" if gid is None or not str(gid).strip() else str(gid).strip()
                if gid in seen_ids:
                    raise UserError(f"duplicate id {gid!r}", path=str(src), line=n, field="id")
                seen_ids.add(gid)
                f.write(json.dumps({"id": f"guideline-{source}-{gid}", "source": f"guidelines/{source}",
                                    "text": text}, ensure_ascii=False, sort_keys=True) + "\n")
                kept_sources[source] += 1
        if not kept_sources:
            raise UserError(f"no guideline left (sources asked: {', '.join(wanted) or 'all'})", path=str(src))
        st.lineage.licenses.add(DATASET_TERMS)
        for s in kept_sources:
            st.lineage.licenses.add(terms.get(s, f"{s}: terms unknown (check before release)"))
            st.lineage.sources.add(f"guidelines/{s}")
        st.extra["stats"] = dict(sorted(stats.items()))
        st.extra["per_source"] = dict(sorted(kept_sources.items()))
        plant_in_stage(st, canaries, str(src))
    return st.result
