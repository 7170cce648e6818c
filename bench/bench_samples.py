"""`--samples 5` vs 5 independent generations on the same items (part of `make bench-eval`).

Both sides draw the same 5 seeds per item with the same sampler on the same prompts (PubMedQA test,
the chain-of-thought prompt, ``max_tokens`` new tokens each, no early stop):

- shared: ``LlamaRunner.generate_samples`` evaluates the prompt once and rolls the KV cache back to
  it before every draw (1 prompt token re-decoded a draw);
- independent: 5 calls of ``LlamaRunner.generate``, each evaluating the item's prompt after the cached
  system prefix (what N plain runs of the bench would cost).

Reported: wall seconds, tokens evaluated, speed-up. Then the real `tools bench pubmedqa --cot
--samples 5` on the same items, for its seconds per item.

    python bench/bench_samples.py --items 10 --max-tokens 32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(model: Path | None = None, items: int = 10, samples: int = 5, max_tokens: int = 32,
            threads: int | None = None, out: Path | None = None) -> dict:
    from evals.bench import run_bench
    from evals.extract import cot_instruction
    from evals.items import load_items, system_prompt, user_message
    from tools.llm import SAMPLING_DEFAULTS, LlamaRunner, item_seed
    from tools.paths import embedded_gguf

    model = model or embedded_gguf()
    its = load_items("pubmedqa", limit=items)[0]
    res: dict = {"items": len(its), "samples": samples, "max_tokens": max_tokens}
    with LlamaRunner(model, n_ctx=4096, n_threads=threads) as lr:
        system = system_prompt("pubmedqa")
        lr.set_prefix(lr.prefix_for(system))
        prompts = [lr.tokenize(lr.render(system, user_message("pubmedqa", it) + "\n\n" +
                                         cot_instruction("pubmedqa", list(it.options)))) for it in its]
        seeds = [[item_seed(0, f"{it.id}#{j}") for j in range(samples)] for it in its]
        lr.eval_prompt(prompts[0])  # warm: the prefix in the cache for both sides
        for name in ("independent", "shared"):
            lr.evaluated_tokens = 0
            gen = 0
            t = time.perf_counter()
            for toks, ss in zip(prompts, seeds):
                if name == "shared":
                    draws = lr.generate_samples(toks, ss, max_tokens=max_tokens, sampling=SAMPLING_DEFAULTS)
                else:
                    draws = [lr.generate(toks, max_tokens=max_tokens, sampling=SAMPLING_DEFAULTS, seed=s) for s in ss]
                gen += sum(ng for _, ng, _ in draws)
            wall = time.perf_counter() - t
            res[name] = {"wall_s": round(wall, 3), "s_per_item": round(wall / len(its), 4),
                         "evaluated_tokens": lr.evaluated_tokens, "generated_tokens": gen}
        res["prompt_tokens_mean"] = round(sum(map(len, prompts)) / len(prompts), 1)
        res["threads"] = lr.n_threads
    res["speedup"] = round(res["independent"]["wall_s"] / res["shared"]["wall_s"], 3)
    if out is not None:
        art = run_bench("pubmedqa", model=model, limit=items, threads=threads, cot=True, samples=samples,
                        max_tokens=max_tokens, out=out, force=True, plots=False)
        r = json.loads((art.path / "results.json").read_text())
        res["bench_cot_samples"] = {"s_per_item": art.extra["timing"]["s_per_item"], "accuracy": r["accuracy"],
                                    "valid_rate": r["valid_rate"], "ties": r["self_consistency"]["ties"]}
    return res


def describe(r: dict) -> str:
    ind, sh = r["independent"], r["shared"]
    line = (f"--samples {r['samples']} on {r['items']} items ({r['prompt_tokens_mean']} prompt tokens, up to "
            f"{r['max_tokens']} new a draw): shared prompt {sh['wall_s']:.1f} s ({sh['evaluated_tokens']} tokens "
            f"evaluated) vs {r['samples']} independent generations {ind['wall_s']:.1f} s ({ind['evaluated_tokens']} "
            f"tokens) -> {r['speedup']:.2f}x")
    if "bench_cot_samples" in r:
        b = r["bench_cot_samples"]
        line += (f"; tools bench --cot --samples {r['samples']}: {b['s_per_item']:.2f} s/item, accuracy "
                 f"{b['accuracy']:.3f}, valid {b['valid_rate']:.3f}, {b['ties']} ties")
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--items", type=int, default=10)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-eval")
    a = ap.parse_args(argv)
    r = measure(a.model, a.items, a.samples, a.max_tokens, a.threads, a.out / "cot-samples")
    print(describe(r), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_samples.json").write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    return 0 if r["shared"]["evaluated_tokens"] < r["independent"]["evaluated_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
