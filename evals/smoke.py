"""The install's smoke check: llama.cpp loads, decodes, generates and scores, in a child process.

``python -m evals.smoke`` (run by ``make install`` and ``make smoke``) starts a child that loads the
embedded GGUF through ``tools.llm.LlamaRunner`` (so with the AMX guard and GPU default the product
uses), evaluates a chat prompt, generates a few tokens and scores one option. The child reports each
step before it takes it; if it dies (a segfault inside llama.cpp, an illegal instruction from a
build for another CPU) the parent prints one line that names the signal, the step and what to do,
and exits 1. ``MEDILORA_SMOKE_SELFTEST=segv`` makes the child kill itself with SIGSEGV at the
decode step: the check's own test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tools.llamacpp import built_with_amx, system_info
from tools.paths import embedded_gguf

STEPS = ("load", "decode", "generate", "score")


def _step(name: str) -> None:
    print(f"step: {name}", flush=True)


def child() -> int:
    from tools.llm import LlamaRunner

    _step("load")
    t0 = time.perf_counter()
    lr = LlamaRunner(embedded_gguf(), n_ctx=512, n_threads=min(2, os.cpu_count() or 1))
    t_load = time.perf_counter() - t0
    try:
        _step("decode")
        if os.environ.get("MEDILORA_SMOKE_SELFTEST") == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        toks = lr.tokenize(lr.render("You are a careful medical assistant.",
                                     "Is aspirin an antiplatelet drug? Answer yes, no or maybe."))
        t0 = time.perf_counter()
        lr.eval_prompt(toks)
        t_pp = time.perf_counter() - t0
        _step("generate")
        t0 = time.perf_counter()
        text, n_gen, _ = lr.generate(toks, max_tokens=8, sampling={}, seed=0)
        t_tg = time.perf_counter() - t0
        _step("score")
        cont = lr.llm.tokenize(b"yes", add_bos=False, special=False)
        (lp, _greedy), = lr.score(toks, [cont])
        if not (lp < 0.0 and lp > -1e4):
            print(f"bad log-likelihood {lp}", file=sys.stderr)
            return 3
        _step("done")
        print(json.dumps({"load_s": round(t_load, 3), "prompt_tokens": len(toks),
                          "pp_tok_s": round(len(toks) / t_pp, 1), "gen_tokens": n_gen,
                          "tg_tok_s": round(n_gen / t_tg, 1) if t_tg else None, "loglik_yes": round(lp, 4),
                          "n_gpu_layers": lr.n_gpu_layers, "amx_guard": lr.amx_guard}), flush=True)
    finally:
        lr.close()
    return 0


def describe_failure(rc: int, last_step: str | None) -> str:
    """One line: what crashed, where, and what to do."""
    where = f"at the {last_step} step" if last_step else "before loading"
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        hint = {"SIGSEGV": "a llama.cpp build whose CPU path crashes here (AMX on a Sapphire Rapids Xeon?)",
                "SIGILL": "a llama.cpp build for a CPU with instructions this one lacks (built on another machine?)"}.get(
            sig, "llama.cpp died")
        what = f"the child process died with {sig} {where}: {hint}"
    else:
        what = f"the child process exited {rc} {where}"
    return (f"error: llama.cpp smoke check failed: {what}; rebuild llama-cpp-python for this CPU with "
            f"`rm .venv/.llama-cpp-* && make install` (see docs/PORTABILITY.md; child log: "
            f"python -m evals.smoke --child)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONFAULTHANDLER",)}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "evals.smoke", "--child"], capture_output=True, text=True,
                           env=env, timeout=float(os.environ.get("MEDILORA_SMOKE_TIMEOUT", "300")))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        steps = [ln[6:] for ln in out.splitlines() if ln.startswith("step: ")]
        print(f"error: llama.cpp smoke check failed: no answer within {e.timeout:.0f} s at the "
              f"{steps[-1] if steps else 'start'} step", file=sys.stderr)
        return 1
    steps = [ln[6:] for ln in r.stdout.splitlines() if ln.startswith("step: ")]
    if r.returncode != 0 or not steps or steps[-1] != "done":
        print(describe_failure(r.returncode or 1, steps[-1] if steps else None), file=sys.stderr)
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"llama.cpp smoke check passed in {time.perf_counter() - t0:.1f} s: load {res['load_s']} s, "
          f"{res['prompt_tokens']}-token prompt at {res['pp_tok_s']} tok/s, {res['gen_tokens']} tokens generated at "
          f"{res['tg_tok_s']} tok/s, one option scored (log p {res['loglik_yes']}); AMX in build: "
          f"{'yes' if built_with_amx(system_info()) else 'no'}, guard: {'on' if res['amx_guard'] else 'off'}, "
          f"GPU layers: {res['n_gpu_layers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
