"""`make bench-eval`: how close `tools bench` runs to llama.cpp's own speed, and how it compares with
lm-eval's `gguf` model against `python -m llama_cpp.server`.

1. The floor: llama.cpp's prompt-processing and generation speed on the same GGUF and threads,
   measured in this run (a fresh 512-token batch; 32 single-token decodes; best of 3 each).
2. Log-likelihood mode on PubMedQA test (default all 500): wall time vs
   floor = sum of prompt tokens / prompt-processing tokens per second.  Target <= 1.2x.
3. Generation mode (default 40 items): wall time vs floor = prompt tokens / pp speed + generated
   tokens / generation speed.  Target <= 1.3x.
4. lm-eval `--model gguf` against `python -m llama_cpp.server` on 127.0.0.1 (default 2 items),
   with the server's `--kv_overrides tokenizer.ggml.add_bos_token=bool:true` (without it
   llama-cpp-python 0.3.36 echoes 0.0 log-likelihoods for models that add no BOS): seconds per
   item vs ours.  Target: ours >= 20x faster per item.
5. `--samples 5` against 5 independent generations on the same items (bench/bench_samples.py):
   one prompt evaluation per item instead of five (default 10 items, 32 new tokens a draw).
   Target: fewer tokens evaluated and less wall time than the independent draws.

Other processes share the CPU here: make the sizes small (--limit 40 --gen-limit 20
--server-items 5) and read the ratios, which are measured under the same load.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def floor_speed(model: Path, threads: int | None, n_pp: int = 512, n_tg: int = 32, reps: int = 3) -> dict:
    from evals.items import load_items, system_prompt, user_message
    from tools.llm import LlamaRunner

    it = load_items("pubmedqa", limit=1)[0][0]
    with LlamaRunner(model, n_threads=threads) as lr:
        toks = lr.tokenize(lr.render(system_prompt("pubmedqa"), user_message("pubmedqa", it)))
        return lr.measure_speed(toks, n_pp=n_pp, n_tg=n_tg, reps=reps)


def run_ours(mode: str, model: Path, limit: int, threads: int | None, out: Path) -> tuple[dict, dict]:
    from evals.bench import run_bench

    art = run_bench("pubmedqa", model=model, mode=mode, limit=limit, threads=threads, out=out, force=True,
                    plots=False)
    res = json.loads((art.path / "results.json").read_text())
    return res, art.extra["timing"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(model: Path, threads: int, log_dir: Path):
    """``python -m llama_cpp.server`` on 127.0.0.1 for lm-eval's gguf model: yields ``(url, failures)``.

    The server gets ``--kv_overrides tokenizer.ggml.add_bos_token=bool:true`` (without it llama-cpp-python
    0.3.36 echoes 0.0 log-likelihoods for models that add no BOS). lm-eval's gguf get_result walks the echoed
    text offsets until they pass the context length; with ChatML special tokens in the prompt the server's
    offsets never get there (special tokens are echoed as empty text) and it raises IndexError. Those
    requests are counted in ``failures["n"]`` instead of aborting, so the route's speed can still be measured.
    """
    import lm_eval.models.gguf as lm_gguf

    failures = {"n": 0}
    orig = lm_gguf.get_result

    def tolerant(logprobs, context_length):
        try:
            return orig(logprobs, context_length)
        except IndexError:
            failures["n"] += 1
            return float("nan"), False
    lm_gguf.get_result = tolerant
    port = _free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / "llama_cpp_server.log", "w")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
           "--kv_overrides", "tokenizer.ggml.add_bos_token=bool:true"]
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            if srv.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited {srv.returncode}; see {log_dir / 'llama_cpp_server.log'}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        yield url, failures
    finally:
        lm_gguf.get_result = orig
        srv.terminate()
        try:
            srv.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.close()


def run_lm_eval_server(model: Path, items: int, threads: int, log_dir: Path) -> dict:
    """lm-eval's gguf model against llama-cpp-python's server, on the same prompts (local task)."""
    from lm_eval import simple_evaluate

    from evals.mmlu import task_manager

    with llama_cpp_server(model, threads, log_dir) as (url, failures):
        t = time.perf_counter()
        res = simple_evaluate(model="gguf", model_args={"base_url": url}, tasks=["medilora_pubmedqa"], limit=items,
                              task_manager=task_manager(), log_samples=True, bootstrap_iters=0)
        wall = time.perf_counter() - t
    samples = res["samples"]["medilora_pubmedqa"]
    lls = [float(r[0]) for s in samples for r in s["filtered_resps"]]
    return {"items": len(samples), "requests": len(lls), "wall_s": wall, "s_per_item": wall / len(samples),
            "s_per_request": wall / len(lls), "all_zero_logliks": all(v == 0.0 for v in lls),
            "unusable_requests": failures["n"],
            "accuracy": res["results"]["medilora_pubmedqa"]["acc,none"]}


def main(argv=None) -> int:
    from tools.llm import physical_cores
    from tools.paths import embedded_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--limit", type=int, default=500, help="PubMedQA test items in log-likelihood mode")
    ap.add_argument("--gen-limit", type=int, default=40, help="items in generation mode (0: skip)")
    ap.add_argument("--server-items", type=int, default=2,
                    help="items for lm-eval gguf + llama_cpp.server (0: skip; ~50 s per request here, 3 requests an item)")
    ap.add_argument("--samples-items", type=int, default=10,
                    help="items for --samples 5 vs 5 independent generations (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-eval")
    ap.add_argument("--quick", action="store_true", help="floor on 64 tokens, one rep (the test's tiny mode)")
    a = ap.parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally blocks: stop the server
    model = a.model or embedded_gguf()
    threads = a.threads or physical_cores()
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": str(model), "threads": threads, "load_avg_start": os.getloadavg()[0]}

    print(f"model {model.name}, {threads} threads, load average {report['load_avg_start']:.2f}", flush=True)
    floor_kw = {"n_pp": 64, "n_tg": 4, "reps": 1} if a.quick else {}
    fl = floor_speed(model, threads, **floor_kw)
    report["floor"] = fl
    print(f"llama.cpp floor: prompt processing {fl['pp_tok_s']:.1f} tok/s, generation {fl['tg_tok_s']:.1f} tok/s",
          flush=True)

    res, tim = run_ours("loglik", model, a.limit, threads, a.out / "loglik")
    floor_s = res["tokens"]["prompt_total"] / fl["pp_tok_s"]
    ll = {"n": res["n"], "wall_s": tim["wall_s"], "s_per_item": tim["s_per_item"],
          "prompt_tokens": res["tokens"]["prompt_total"], "evaluated_tokens": tim["evaluated_tokens"],
          "floor_s": round(floor_s, 3), "ratio_to_floor": round(tim["wall_s"] / floor_s, 3),
          "accuracy": res["accuracy"], "target": 1.2}
    report["loglik"] = ll
    print(f"loglik: {ll['n']} items in {ll['wall_s']:.1f} s ({ll['s_per_item']:.3f} s/item); floor {floor_s:.1f} s "
          f"-> {ll['ratio_to_floor']:.2f}x (target <= 1.2x); accuracy {res['accuracy']:.3f}", flush=True)

    if a.gen_limit:
        fl2 = floor_speed(model, threads, **floor_kw)  # re-measured next to the run it judges
        res, tim = run_ours("generate", model, a.gen_limit, threads, a.out / "generate")
        floor_s = res["tokens"]["prompt_total"] / fl2["pp_tok_s"] + res["tokens"]["generated_total"] / fl2["tg_tok_s"]
        gen = {"n": res["n"], "wall_s": tim["wall_s"], "s_per_item": tim["s_per_item"],
               "prompt_tokens": res["tokens"]["prompt_total"], "generated_tokens": res["tokens"]["generated_total"],
               "floor": fl2, "floor_s": round(floor_s, 3), "ratio_to_floor": round(tim["wall_s"] / floor_s, 3),
               "accuracy": res["accuracy"], "valid_rate": res["valid_rate"], "target": 1.3}
        report["generate"] = gen
        print(f"generate: {gen['n']} items in {gen['wall_s']:.1f} s ({gen['s_per_item']:.3f} s/item, "
              f"{gen['generated_tokens']} new tokens); floor {floor_s:.1f} s -> {gen['ratio_to_floor']:.2f}x "
              f"(target <= 1.3x); accuracy {gen['accuracy']:.3f}, valid {gen['valid_rate']:.3f}", flush=True)

    if a.samples_items:
        from bench_samples import describe, measure
        sm = measure(model, a.samples_items, 5, 32, threads, a.out / "cot-samples")
        report["samples"] = sm
        print(describe(sm), flush=True)

    if a.server_items:
        srv = run_lm_eval_server(model, a.server_items, threads, a.out)
        srv["speedup_ours"] = round(srv["s_per_item"] / ll["s_per_item"], 2)
        srv["target"] = 20
        report["lm_eval_gguf_server"] = srv
        print(f"lm-eval gguf + llama_cpp.server: {srv['items']} items ({srv['requests']} requests) in "
              f"{srv['wall_s']:.1f} s = {srv['s_per_item']:.2f} s/item, {srv['s_per_request']:.2f} s/request; "
              f"ours {ll['s_per_item']:.3f} s/item -> {srv['speedup_ours']:.1f}x faster (target >= 20x); "
              f"all log-likelihoods 0.0: {srv['all_zero_logliks']}; unusable answers (lm-eval's offset bug): "
              f"{srv['unusable_requests']}/{srv['requests']}", flush=True)

    report["load_avg_end"] = os.getloadavg()[0]
    (a.out / "bench_eval.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    ok = ll["ratio_to_floor"] <= 1.2
    ok &= report.get("generate", {}).get("ratio_to_floor", 0) <= 1.3
    ok &= report.get("lm_eval_gguf_server", {}).get("speedup_ours", 99) >= 20
    if "samples" in report:  # the prompt is evaluated once for the N samples: fewer tokens and less time
        sm = report["samples"]
        ok &= sm["shared"]["evaluated_tokens"] < sm["independent"]["evaluated_tokens"] and sm["speedup"] > 1
    print(f"{'PASS' if ok else 'MISS'}: figures in {a.out / 'bench_eval.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
