"""`make bench-quant-budget`: does the budget search (`tools quantize --budget`) beat llama.cpp's stock types?

SmolLM2-135M-Instruct (the embedded GGUF, turned into an HF model and converted to f16 with llama.cpp's
converter), an importance matrix from PubMedQA *dev* contexts (bench_imatrix's corpus), every candidate
measured against the f16 on held-out medical text (PubMedQA *test* contexts, never used for the imatrix;
>= 4096 scored tokens): the stock types and the documented mixes (release/budget.py) around the bases of
``--mix-bases`` (Q4_0, Q4_1 and Q4_K_M: the two legacy 4-bit types most of this model's tensors can take,
its rows of 576 not being a multiple of 256, and the most used K type; every base would be ~130
candidates). Caveat: the only SmolLM2 weights this machine has are the embedded Q4_1 release, so the
"f16" is that file dequantized; its layer weights lie exactly on Q4_1's grid and its embeddings on Q8_0's,
which makes Q4_1 (and a mix keeping Q4_1 on the layers) nearly lossless here. Reported:

- which stock types the search's front **strictly dominates** (a mix that is no larger at a lower mean
  KL, or smaller at no higher KL), each as a size ratio and a KL ratio;
- the search's time (plan + reference + the candidates it measures: smallest first, up to the first
  within the budget) against measuring every candidate, from the per-candidate times of one exhaustive run
  (``--tiny`` also runs the real search and checks it picks the same file).

``--tiny`` does the same on the tiny random Llama with few tokens (seconds; tests/release/test_budget.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def dominance(rows: list[dict]) -> list[dict]:
    """For each measured stock type, the mix that strictly dominates it with the smallest size (if any), and
    whether the two mean-KL intervals are disjoint (the lower KL is then more than sampling noise)."""
    mixes = [r for r in rows if not r["stock"] and r["mean_kl"] is not None]
    out = []
    for s in (r for r in rows if r["stock"] and r["mean_kl"] is not None):
        dom = [m for m in mixes if m["size_bytes"] <= s["size_bytes"] and m["mean_kl"] <= s["mean_kl"]
               and (m["size_bytes"] < s["size_bytes"] or m["mean_kl"] < s["mean_kl"])]
        if dom:
            m = min(dom, key=lambda m: (m["size_bytes"], m["mean_kl"]))
            out.append({"stock": s["recipe"], "by": m["recipe"], "size_ratio": round(m["size_bytes"] / s["size_bytes"], 4),
                        "kl_ratio": round(m["mean_kl"] / s["mean_kl"], 4) if s["mean_kl"] else None,
                        "stock_kl_ci95": s["mean_kl_ci95"], "mix_kl_ci95": m["mean_kl_ci95"],
                        "kl_ci_disjoint": m["mean_kl_ci95"][1] < s["mean_kl_ci95"][0]})
    return out


def search_time(table: dict, max_kl: float) -> tuple[float, str | None, int]:
    """Seconds the search spends (plan + reference + candidates smallest first up to the first within budget),
    the recipe it picks and how many it measures, from an exhaustive run's per-candidate times."""
    t = table["setup_seconds"]
    n = 0
    for r in sorted(table["candidates"], key=lambda r: r["size_bytes"]):
        t += r["seconds"]
        n += 1
        if r["mean_kl"] <= max_kl:
            return t, r["recipe"], n
    return t, None, n


def setup(a, out: Path):
    """The f16 GGUF and the imatrix artifact (tiny: a tiny Llama; full: SmolLM2-135M)."""
    from bench.bench_imatrix import dev_corpus
    from release.convert import Gate, convert_stage
    from release.imatrix import ImatrixRun, imatrix_stage
    from tools.hfmodels import gguf_to_hf
    from tools.paths import embedded_gguf
    from tools.tinymodel import tiny_base_model

    if a.f16:
        f16 = a.f16
    else:
        hf = tiny_base_model(out / "tiny-hf").path if a.tiny else gguf_to_hf(embedded_gguf(), out / "hf").path
        art = convert_stage(hf, out / "f16", "f16", gate=Gate(tokens=0 if a.tiny else 256))
        f16 = art.path / art.extra["file"]
    imx = imatrix_stage(f16, dev_corpus(out / "corpus-dev"), out / "imatrix",
                        ImatrixRun(chunks=2 if a.tiny else a.imatrix_chunks, ctx=128 if a.tiny else 512, threads=a.threads))
    return f16, imx


def main(argv: list[str] | None = None) -> int:
    from bench.bench_imatrix import pubmedqa_contexts
    from release.budget import Budget, SearchSpec, quantize_budget

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-quant-budget")
    ap.add_argument("--tiny", action="store_true", help="Tiny random Llama, few tokens: a fast check of the bench.")
    ap.add_argument("--budget-kl", type=float, default=0.05, help="The KL budget whose search time is reported.")
    ap.add_argument("--types", default=None, help="Stock types [all; IQ types with the imatrix].")
    ap.add_argument("--mix-bases", default="Q4_0,Q4_1,Q4_K_M",
                    help="Stock types the mixes are built around (fewer = faster).")
    ap.add_argument("--min-tokens", type=int, default=4096, help="Held-out tokens scored per candidate.")
    ap.add_argument("--heldout-items", type=int, default=40, help="PubMedQA test contexts in the held-out text.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--f16", type=Path, help="An f16 GGUF to start from instead of converting one.")
    ap.add_argument("--imatrix-chunks", type=int, default=16, help="Imatrix chunks of 512 tokens (PubMedQA dev).")
    a = ap.parse_args(argv)
    if a.tiny:
        a.types, a.mix_bases, a.min_tokens = a.types or "Q4_0,Q8_0,IQ4_NL", "Q4_0,Q8_0", min(a.min_tokens, 511)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    f16, imx = setup(a, out)
    heldout = out / "heldout-pubmedqa-test.txt"
    heldout.write_text("\n\n".join(t for _, t in pubmedqa_contexts("test")[: a.heldout_items]) + "\n", encoding="utf-8")
    split = lambda s: tuple(x.strip().upper() for x in s.split(",")) if s else None  # noqa: E731
    spec = SearchSpec(Budget(), types=split(a.types), imatrix=imx.path, text_file=heldout,
                      min_tokens=a.min_tokens, threads=a.threads, measure_all=True, mix_bases=split(a.mix_bases))
    every = quantize_budget(f16, out / "all", spec, force=True)
    table = json.loads((every.path / "candidates.json").read_text())
    rows = table["candidates"]
    dom = dominance(rows)
    t_search, pick, n_search = search_time(table, a.budget_kl)
    report = {"model": f16.name, "tokens_scored": rows[0]["tokens_scored"], "candidates": len(rows),
              "stock": sum(r["stock"] for r in rows), "dominated_stock_types": dom,
              "front_dominates_two_or_more": len(dom) >= 2, "budget_kl": a.budget_kl, "search_pick": pick,
              "search_measured": n_search, "search_seconds": round(t_search, 1),
              "every_candidate_seconds": round(table["setup_seconds"] + sum(r["seconds"] for r in rows), 1),
              "imatrix": {k: imx.extra[k] for k in ("corpus_stage", "chunks", "ctx", "tokens")}}
    if a.tiny:  # the real search, to check the per-candidate accounting
        t1 = time.monotonic()
        real = quantize_budget(f16, out / "search", SearchSpec(Budget(max_kl=a.budget_kl), types=spec.types,
                               imatrix=imx.path, text_file=heldout, min_tokens=a.min_tokens, threads=a.threads,
                               mix_bases=spec.mix_bases), force=True)
        report.update({"real_search_pick": real.extra["chosen"]["recipe"], "real_search_measured":
                       real.extra["measured"], "real_search_seconds": round(time.monotonic() - t1, 1)})
    report["seconds"] = round(time.monotonic() - t0, 1)
    (out / "bench_quant_budget.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    md = markdown(report, every.path, rows)
    (out / "bench_quant_budget.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"figures in {out / 'bench_quant_budget.json'}; every candidate: {every.path / 'candidates.md'}, "
          f"plot {every.path / 'pareto.png'}")
    return 0


def front_table(rows: list[dict]) -> list[str]:
    """Every measured candidate by size: stock or mix, size, mean KL with its interval, on the Pareto front."""
    from release.budget import pareto_front

    m = sorted((x for x in rows if x["mean_kl"] is not None), key=lambda x: (x["size_bytes"], x["mean_kl"]))
    front = set(pareto_front([(x["size_bytes"], x["mean_kl"]) for x in m]))
    L = ["| candidate | stock | size MB | bits/weight | mean KL [95 % CI] | top-1 | front |", "|---|---|---|---|---|---|---|"]
    for i, x in enumerate(m):
        lo, hi = x["mean_kl_ci95"]
        L.append(f"| {x['recipe']} | {'yes' if x['stock'] else 'mix'} | {x['size_bytes'] / 1e6:.2f} | "
                 f"{x['bits_per_weight']:.3f} | {x['mean_kl']:.4g} [{lo:.4g}, {hi:.4g}] | "
                 f"{100 * x['top1_agreement']:.1f}% | {'yes' if i in front else ''} |")
    return L


def markdown(r: dict, every: Path, rows: list[dict] | None = None) -> str:
    L = [f"{r['candidates']} candidates ({r['stock']} stock types) of `{r['model']}`, mean KL vs f16 on "
         f"{r['tokens_scored']} held-out tokens (PubMedQA test contexts); imatrix from {r['imatrix']['corpus_stage']} "
         f"({r['imatrix']['tokens']} tokens).", "",
         "| stock type | dominated by (mix) | size ratio | KL ratio | stock KL 95 % CI | mix KL 95 % CI | CIs disjoint |",
         "|---|---|---|---|---|---|---|"]
    for d in r["dominated_stock_types"]:
        L.append(f"| {d['stock']} | {d['by']} | {d['size_ratio']:.3f} | {d['kl_ratio']:.3f} | {d['stock_kl_ci95']} | "
                 f"{d['mix_kl_ci95']} | {'yes' if d['kl_ci_disjoint'] else 'no'} |")
    L += ["", f"The front strictly dominates {len(r['dominated_stock_types'])} stock types (two or more: "
          f"{'yes' if r['front_dominates_two_or_more'] else 'no'}; with disjoint KL intervals: "
          f"{sum(d['kl_ci_disjoint'] for d in r['dominated_stock_types'])}).",
          f"Search for kl={r['budget_kl']:g}: picks {r['search_pick']} after measuring {r['search_measured']} of "
          f"{r['candidates']} candidates, {r['search_seconds']:.0f} s against {r['every_candidate_seconds']:.0f} s "
          "for measuring every candidate.", f"Every candidate: `{every / 'candidates.md'}`.", ""]
    if rows:
        L += front_table(rows) + [""]
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
