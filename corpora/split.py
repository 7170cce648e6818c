"""Deterministic stratified train/validation/test splits of a dataset artifact."""
from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from pathlib import Path

from tools.artifact import Stage, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl, write_jsonl
from tools.plotting import pyplot, save_png
from tools.stages import DATASET

SPLITS = ("train", "validation", "test")


def parse_ratios(text: str) -> tuple[float, float, float]:
    try:
        r = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise UserError(f"--ratios wants three numbers like 0.8,0.1,0.1, got {text!r}", field="--ratios") from None
    if len(r) != 3 or any(x < 0 for x in r) or abs(sum(r) - 1) > 1e-6 or r[0] <= 0:
        raise UserError(f"--ratios wants three non-negative numbers summing to 1 (train > 0), got {text!r}",
                        field="--ratios")
    return r  # type: ignore[return-value]


def stratum(row: dict, key: str | None) -> str:
    """The value of ``key`` in ``meta`` (or at the top level); dotted keys go deeper."""
    if key is None:
        return ""
    for base in (row.get("meta") or {}, row):
        cur = base
        for part in key.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                cur = None
                break
        if cur is not None:
            return str(cur)
    raise KeyError(key)


def allocate(n: int, ratios) -> list[int]:
    """Counts per split for ``n`` items: floors, then the remainders by largest fraction."""
    exact = [n * r for r in ratios]
    counts = [int(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def group_counts(sizes: dict[str, int], ratios) -> dict[str, list[int]]:
    """Per-stratum counts per split: each within 1 of its exact share, and the totals per split
    equal to the unstratified allocation (remainders go where the split still lacks items)."""
    totals = allocate(sum(sizes.values()), ratios)
    counts = {g: [int(n * r) for r in ratios] for g, n in sizes.items()}
    room = [totals[s] - sum(c[s] for c in counts.values()) for s in range(len(ratios))]
    for g in sorted(sizes):
        n, c = sizes[g], counts[g]
        frac = [n * r - c[s] for s, r in enumerate(ratios)]
        for _ in range(n - sum(c)):
            cands = [s for s in range(len(ratios)) if frac[s] > 0]
            s = min(cands or range(len(ratios)), key=lambda s: (room[s] <= 0, -frac[s], s))
            c[s] += 1
            room[s] -= 1
            frac[s] = 0.0
    return counts


def split_rows(rows: list[dict], ratios, key: str | None, seed: int) -> dict[str, list[dict]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[stratum(r, key)].append(i)
    counts = group_counts({g: len(v) for g, v in groups.items()}, ratios)
    assign = {}
    for g in sorted(groups):
        idx = list(groups[g])
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}\0{g}".encode()).digest()[:8], "big"))
        rng.shuffle(idx)
        c = counts[g]
        bounds = [0, c[0], c[0] + c[1], len(idx)]
        for s, name in enumerate(SPLITS):
            for i in idx[bounds[s]:bounds[s + 1]]:
                assign[i] = name
    out = {name: [] for name in SPLITS}
    for i, r in enumerate(rows):  # keep the input order inside each split
        out[assign[i]].append(r)
    return out


def plot_split(table: dict[str, Counter], out: Path, key: str | None) -> None:
    plt = pyplot()

    strata = sorted({s for c in table.values() for s in c})[:20]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bottom = [0.0] * len(SPLITS)
    for s in strata:
        tot = [max(1, sum(table[n].values())) for n in SPLITS]
        vals = [table[n][s] / tot[j] for j, n in enumerate(SPLITS)]
        ax.bar(SPLITS, vals, bottom=bottom, label=s or "(all)")
        bottom = [b + v for b, v in zip(bottom, vals)]
    for j, n in enumerate(SPLITS):
        ax.text(j, 1.01, f"n={sum(table[n].values())}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of the split")
    ax.set_title(f"stratified by {key}" if key else "random split")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, out)


def split_dataset(src, out, *, ratios=(0.8, 0.1, 0.1), stratify_by: str | None = None, seed: int = 0,
                  plot: bool = True, force: bool = False, log=None):
    art = read_artifact(src, stage=DATASET)
    if Path(out).resolve() == art.path.resolve():
        raise UserError("--out must differ from the input folder (the input artifact stays as it is)", field="--out")
    existing = [n for n in ("validation.jsonl", "test.jsonl") if (art.path / n).exists()]
    if existing:
        raise UserError(f"already split (has {existing[0]}); split the unsplit dataset", path=str(art.path))
    train = art.file("train.jsonl")
    params = {"ratios": list(ratios), "stratify_by": stratify_by, "seed": seed, "input_stage": art.stage}
    with Stage(art.stage, out, params, inputs=[art.path], force=force, log=log) as st:
        if st.skipped:
            return st.result
        rows = []
        for n, row in enumerate(read_jsonl(train, required=("id",)), 1):
            if stratify_by is not None:
                try:
                    stratum(row, stratify_by)
                except KeyError:
                    raise UserError(f"no {stratify_by!r} in meta or the row", path=str(train), line=n,
                                    field=stratify_by) from None
            rows.append(row)
        parts = split_rows(rows, ratios, stratify_by, seed)
        table = {}
        for name in SPLITS:
            table[name] = Counter(stratum(r, stratify_by) for r in parts[name])
            if parts[name]:  # no empty files: readers refuse them, Axolotl chokes on them
                write_jsonl(st.path(f"{name}.jsonl"), parts[name])
            elif log:
                log(f"split: {name} gets no item (ratio {ratios[SPLITS.index(name)]}): no {name}.jsonl written")
        if plot:
            plot_split(table, st.path("split.png"), stratify_by)
        st.extra["split"] = {n: {"items": len(parts[n]), "strata": dict(sorted(table[n].items()))} for n in SPLITS}
        st.extra["split_of"] = art.stage
    return st.result
