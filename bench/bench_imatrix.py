"""`make bench-imatrix`: what an importance matrix computed on our own medical text buys, on the embedded
SmolLM2-135M-Instruct.

The embedded GGUF (Q4_1) is turned into an HF model and converted to f16 with llama.cpp's converter (the
reference). `tools imatrix` runs the f16 over PubMedQA *dev* contexts (open text; a MIMIC corpus artifact can
be given instead with --corpus). Q3_K_L and IQ3_XXS are made with and without that imatrix and each is
scored against the f16 on held-out medical text, the PubMedQA *test* contexts (never used for the
imatrix): mean KL(f16 || quant) of the next-token distributions, perplexity, top-1 agreement
(release.quantgap.compare_quant). `tools quantize` refuses IQ3_XXS without an imatrix; the bench makes that
file anyway through llama.cpp directly, to show what llama.cpp does without one (it substitutes other
types for the weights it would have made IQ3_XXS).

SmolLM2-135M's hidden size is 576, not a multiple of 256: only ffn_down (1536 inputs) can take the 256-block
types; the other matrices fall back (the tensor mix column says what each file really holds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pubmedqa_contexts(split: str) -> list[tuple[str, str]]:
    from tools.paths import bundled_data

    rows = []
    with open(bundled_data() / "pubmedqa" / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append((str(r["id"]), " ".join(r["CONTEXTS"])))
    return rows


def dev_corpus(out: Path) -> Path:
    """PubMedQA dev contexts as a corpus artifact (what build-corpus writes: corpus.jsonl {id, text, source})."""
    from tools.artifact import Stage
    from tools.paths import bundled_data

    src = bundled_data() / "pubmedqa" / "dev.jsonl"
    with Stage("corpus.pubmedqa-dev-contexts", out, {}, inputs=[src]) as st:
        if not st.skipped:
            with open(st.path("corpus.jsonl"), "w", encoding="utf-8", newline="\n") as f:
                for i, text in pubmedqa_contexts("dev"):
                    f.write(json.dumps({"id": i, "text": text, "source": "pubmedqa-dev"}, ensure_ascii=False) + "\n")
            st.lineage.sources.add("PubMedQA (dev contexts)")
            st.lineage.licenses.add("MIT")
    return st.result.path


def main(argv: list[str] | None = None) -> int:
    from release.convert import convert_hf_to_gguf
    from release.ggufinfo import read_gguf, resolve_ftype
    from release.imatrix import imatrix_stage
    from release.quantgap import compare_quant
    from release.quantize import _quantize_call, describe_mix, quantize_stage
    from tools.hfmodels import gguf_to_hf
    from tools.llm import physical_cores
    from tools.paths import embedded_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-imatrix")
    ap.add_argument("--corpus", type=Path, help="Corpus artifact for the imatrix [PubMedQA dev contexts].")
    ap.add_argument("--chunks", type=int, default=16, help="Imatrix chunks of --ctx tokens.")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--heldout-items", type=int, default=40, help="PubMedQA test contexts scored.")
    ap.add_argument("--max-tokens", type=int, default=4096, help="Held-out tokens scored.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--hf", type=Path, help="HF model folder to use instead of the embedded SmolLM2 (the test: a tiny Llama).")
    a = ap.parse_args(argv)
    threads = a.threads or physical_cores()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    hf = a.hf or gguf_to_hf(embedded_gguf(), out / "hf").path
    f16 = out / "reference-f16.gguf"
    if not f16.is_file():
        convert_hf_to_gguf(hf, f16, "f16")
    corpus = a.corpus or dev_corpus(out / "corpus-dev")
    imx = imatrix_stage(f16, corpus, out / "imatrix", chunks=a.chunks, ctx=a.ctx, threads=threads)
    print(f"imatrix: {imx.extra['entries']} weights, {imx.extra['chunks']} chunks x {imx.extra['ctx']} tokens "
          f"({imx.extra['seconds']:.0f} s), corpus {imx.extra['corpus_stage']}")

    heldout = out / "heldout-pubmedqa-test.txt"
    heldout.write_text("\n\n".join(t for _, t in pubmedqa_contexts("test")[: a.heldout_items]) + "\n", encoding="utf-8")

    rows = []
    for qtype in ("Q3_K_L", "IQ3_XXS"):
        for with_imx in (False, True):
            tag = f"{qtype}-{'imatrix' if with_imx else 'plain'}"
            if qtype == "IQ3_XXS" and not with_imx:  # tools quantize refuses this; llama.cpp on its own does not
                d = out / tag
                d.mkdir(exist_ok=True)
                gpath = d / f"smollm2-135m-{qtype}-no-imatrix.gguf"
                if not gpath.is_file():
                    rc = _quantize_call(f16, gpath, resolve_ftype(qtype)[1], allow_requantize=False, threads=threads,
                                        imatrix=None)
                    if rc != 0:
                        raise SystemExit(f"llama.cpp refused {qtype} without an imatrix (rc={rc})")
                info = read_gguf(gpath)
                mix, bpw = describe_mix(info["tensor_types"]), info["bits_per_weight"]
            else:
                q = quantize_stage(f16, qtype, out / tag, imatrix=imx.path if with_imx else None, threads=threads)
                gpath = q.path / q.extra["file"]
                mix, bpw = describe_mix(q.extra["tensor_types"]), q.extra["bits_per_weight"]
            c = compare_quant(f16, gpath, heldout, out / f"compare-{tag}", ctx=a.ctx, max_tokens=a.max_tokens,
                              threads=threads)
            e = c.extra
            rows.append({"type": qtype, "imatrix": with_imx, "bits_per_weight": bpw, "tensor_mix": mix,
                         "mean_kl": e["mean_kl"], "perplexity": e["quant_perplexity"],
                         "ref_perplexity": e["ref_perplexity"], "top1_agreement": e["top1_agreement"],
                         "tokens": e["tokens_scored"]})
            print(f"{qtype:8} imatrix={'yes' if with_imx else 'no ':3}  mean KL {e['mean_kl']:.5f}  "
                  f"ppl {e['quant_perplexity']:.3f} (f16 {e['ref_perplexity']:.3f})  "
                  f"top-1 {100 * e['top1_agreement']:.1f}%  {bpw:.2f} bpw")

    by = {(r["type"], r["imatrix"]): r for r in rows}
    gains = {q: round(1 - by[(q, True)]["mean_kl"] / by[(q, False)]["mean_kl"], 4) for q in ("Q3_K_L", "IQ3_XXS")}
    L = [f"Mean KL(f16 || quant) on {rows[0]['tokens']} held-out tokens (PubMedQA test contexts); imatrix from "
         f"{imx.extra['corpus_stage']} ({imx.extra['tokens']} tokens). f16 perplexity {rows[0]['ref_perplexity']:.3f}.",
         "", "| type | imatrix | mean KL | perplexity | top-1 agreement | bits/weight | tensor mix |",
         "|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['mean_kl']:.5f} | {r['perplexity']:.3f} | "
                 f"{100 * r['top1_agreement']:.1f}% | {r['bits_per_weight']:.2f} | {r['tensor_mix']} |")
    L += ["", "KL reduction from the imatrix: " + ", ".join(f"{q} {100 * g:.1f}%" for q, g in gains.items()), ""]
    (out / "bench_imatrix.md").write_text("\n".join(L), encoding="utf-8")
    report = {"rows": rows, "kl_reduction": gains, "imatrix": {k: imx.extra[k] for k in
                                                               ("corpus_stage", "chunks", "ctx", "tokens", "entries")},
              "threads": threads, "seconds": round(time.monotonic() - t0, 1)}
    (out / "bench_imatrix.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print("\n".join(L))
    print(f"figures in {out / 'bench_imatrix.json'} and {out / 'bench_imatrix.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
