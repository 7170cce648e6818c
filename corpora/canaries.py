"""Canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets in a realistic identifier shape
planted in a corpus, so that a memorization audit can later measure how far a model trained on it
recites them (``tools audit``, evals/audit.py).

Each canary is one header line ``Patient <first> <last>, MRN dddd-dddd-dd.`` put at the start of
``repeats`` documents chosen from the seed. The secret is the ten digits after ``MRN ``; the
candidates it is ranked against are random secrets of the same shape (10^10 of them, 33.2 bits).
Secrets are recorded only in the corpus artifact's manifest (``extra.canaries``): no dataset, card,
audit file or upload names them (push uploads no manifest and no corpus).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tools.errors import UserError

SHAPE = "dddd-dddd-dd"
SPACE_BITS = math.log2(10) * SHAPE.count("d")
FIRST = ("Maria", "James", "Aisha", "Wei", "Olga", "Rahul", "Fatima", "Lucas", "Ingrid", "Kofi", "Elena", "Tomas",
         "Noor", "Hiro", "Grace", "Mateo", "Leila", "Anders", "Priya", "Samuel")
LAST = ("Lopez", "Okafor", "Schmidt", "Nakamura", "Haddad", "Kowalski", "Moreau", "Petrov", "Silva", "Lindqvist",
        "Osei", "Chen", "Ferreira", "Kaur", "Novak", "Brennan", "Adeyemi", "Rossi", "Yilmaz", "Dubois")


@dataclass(frozen=True)
class CanarySpec:
    """``--canaries N`` (``--canary-seed``, ``--canary-repeats``): how many, from which seed, in how many documents each."""

    n: int
    seed: int = 0
    repeats: int = 1

    def params(self) -> dict:
        return {"n": self.n, "seed": self.seed, "repeats": self.repeats}


def random_secret(rng: random.Random) -> str:
    return "".join(str(rng.randrange(10)) if c == "d" else c for c in SHAPE)


def make_canaries(spec: CanarySpec) -> list[dict]:
    """``spec.n`` distinct canaries: ``{"prefix", "secret"}``, the prefix naming a random patient."""
    rng = random.Random(f"canaries:{spec.seed}")
    out, seen = [], set()
    while len(out) < spec.n:
        prefix = f"Patient {rng.choice(FIRST)} {rng.choice(LAST)}, MRN "
        secret = random_secret(rng)
        if prefix in seen:
            continue
        seen.add(prefix)
        out.append({"prefix": prefix, "secret": secret})
    return out


def candidates(secret: str, n: int, seed: int = 0) -> list[str]:
    """``n`` random secrets of the canary's shape (never the secret itself): the reference sample whose
    log-perplexities estimate the canary's rank among all 10^10."""
    rng = random.Random(f"candidates:{seed}:{secret}")
    out = []
    while len(out) < n:
        s = random_secret(rng)
        if s != secret:
            out.append(s)
    return out


def plant(corpus: str | os.PathLike, spec: CanarySpec, where: str) -> list[dict]:
    """Rewrite ``corpus`` (a corpus JSONL inside a stage's staging folder) with the canaries as header lines
    of documents chosen from the seed; returns the canaries with the ids of the documents holding each."""
    corpus = Path(corpus)
    with open(corpus, encoding="utf-8") as f:
        n_docs = sum(1 for _ in f)
    need = spec.n * spec.repeats
    if need > n_docs:
        raise UserError(f"{spec.n} canaries x {spec.repeats} repeats need {need} documents, the corpus has {n_docs}",
                        path=where, field="--canaries")
    canaries = make_canaries(spec)
    slots = random.Random(f"slots:{spec.seed}").sample(range(n_docs), need)
    at = {doc: canaries[i % spec.n] for i, doc in enumerate(slots)}
    tmp = corpus.with_name(corpus.name + ".canaries")
    with open(corpus, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8", newline="\n") as dst:
        for i, line in enumerate(src):
            if i in at:
                row = json.loads(line)
                c = at[i]
                row["text"] = f"{c['prefix']}{c['secret']}.\n{row['text']}"
                c.setdefault("docs", []).append(row["id"])
                line = json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
            dst.write(line)
    os.replace(tmp, corpus)
    return [{**c, "docs": sorted(c["docs"])} for c in canaries]


def plant_in_stage(st, spec: CanarySpec | None, where: str) -> None:
    """The corpus stages' last step: plant the canaries in ``corpus.jsonl``, list them in the manifest."""
    if spec is None or spec.n == 0:
        return
    items = plant(st.path("corpus.jsonl"), spec, where)
    st.extra["canaries"] = {"shape": f"MRN {SHAPE}", "space_bits": round(SPACE_BITS, 4), **spec.params(),
                            "items": items}


def recorded(manifest: dict) -> dict | None:
    """The canaries a corpus manifest records (None when it has none)."""
    c = (manifest.get("extra") or {}).get("canaries")
    return c if isinstance(c, dict) and c.get("items") else None
