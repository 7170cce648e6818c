"""`make bench-llama`: llama.cpp speed of the installed build (AMX left out, repacking kept) against
the guard's fallback (no extra buffer types: what a build *with* AMX is loaded with on an AMX CPU),
measured in one run on the embedded GGUF (Q4_1) and a Q3_K_L made from it, with the figures
measured before this build (the previous `-march=native` build on this kind of machine, from
docs/PORTABILITY.md) printed beside them.

Prompt processing: a fresh 512-token batch; generation: 32 single-token decodes; best of 3 each.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The previous build (pip's default: native CPU detection, OpenMP, AMX where the CPU has it), 2 threads,
# same kind of machine: Q4_1 from `make bench-eval`'s floor (same method: 512-token batch, 32 decodes,
# best of 3), Q3_K_L from docs/CPU_FACTS.md.
BEFORE = {"Q4_1": {"pp_tok_s": 213.9, "tg_tok_s": 89.5}, "Q3_K_L": {"pp_tok_s": 290.0, "tg_tok_s": 60.0}}


def speed(model: Path, threads: int, guard: bool, quick: bool = False) -> dict:
    import tools.llamacpp as lc
    from evals.items import load_items, system_prompt, user_message
    from tools.llm import LlamaRunner

    orig = lc.amx_guard_needed
    lc.amx_guard_needed = lambda info, flags, env=None: guard
    try:
        it = load_items("pubmedqa", limit=1)[0][0]
        with LlamaRunner(model, n_threads=threads) as lr:
            toks = lr.tokenize(lr.render(system_prompt("pubmedqa"), user_message("pubmedqa", it)))
            return lr.measure_speed(toks, **({"n_pp": 64, "n_tg": 4, "reps": 1} if quick else
                                             {"n_pp": 512, "n_tg": 32, "reps": 3}))
    finally:
        lc.amx_guard_needed = orig


def main(argv: list[str] | None = None) -> int:
    from release.quantize import quantize_stage
    from tools.llamacpp import built_with_amx, cpu_flags, system_info
    from tools.llm import physical_cores
    from tools.paths import embedded_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-llama")
    ap.add_argument("--quick", action="store_true", help="64 prompt tokens, 4 decodes, one rep (the test's tiny mode)")
    a = ap.parse_args(argv)
    threads = a.threads or physical_cores()
    a.out.mkdir(parents=True, exist_ok=True)
    info = system_info()
    amx_cpu = bool({"amx_tile", "amx_int8"} & cpu_flags())
    print(f"llama.cpp build: {info}")
    print(f"CPU has AMX: {amx_cpu}; build has AMX: {built_with_amx(info)}; {threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        q3 = quantize_stage(embedded_gguf(), "Q3_K_L", Path(tmp) / "q3", allow_requantize=True, threads=threads)
        models = {"Q4_1": embedded_gguf(), "Q3_K_L": q3.path / q3.extra["file"]}
        report = {"system_info": info, "cpu_amx": amx_cpu, "threads": threads, "models": {}}
        print(f"{'model':8} {'load':28} {'pp tok/s':>9} {'tg tok/s':>9}   before (native build): pp / tg")
        for name, path in models.items():
            rows = {}
            for label, guard in (("build default (repack on)", False), ("guard fallback (no repack)", True)):
                s = speed(path, threads, guard, a.quick)
                rows[label] = s
                b = BEFORE[name]
                print(f"{name:8} {label:28} {s['pp_tok_s']:9.1f} {s['tg_tok_s']:9.1f}   "
                      f"{b['pp_tok_s']:.0f} / {b['tg_tok_s']:.0f}", flush=True)
            report["models"][name] = {"measured": rows, "before": BEFORE[name]}
    (a.out / "bench_llama.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"figures in {a.out / 'bench_llama.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
