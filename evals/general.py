"""`tools eval general --model M`: general ability as perplexity on held-out general English.

The text is the held-out half of CPython's topic docs (corpora.general: shipped with Python,
PSF-2.0, never replayed in training). It is tokenized once, cut into windows of ``ctx`` tokens and
each window scored from an empty context (the first token is context only). Figures: mean negative
log-likelihood per token and perplexity = exp(mean), with a 95 % interval from a seeded bootstrap
over windows (1000 resamples of the ratio sum NLL / sum tokens). ``windows.jsonl`` keeps every
window's NLL, so two runs of models with one tokenizer pair window by window
(:func:`paired_delta`, `tools report --general BASE --general TUNED`). An HF folder runs through
transformers (float32; a LoRA adapter folder such as ``STAGE/output`` on the base it names), a GGUF
(a file or a GGUF artifact folder, tools.ggufpath.resolve_gguf) through llama.cpp (tools.llm.LlamaRunner.score).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from corpora.general import LICENSE, SOURCE, heldout_text
from tools.artifact import Artifact, Stage, read_artifact
from tools.errors import UserError
from tools.ggufpath import resolve_gguf
from tools.io import read_jsonl, sha256_bytes, write_json, write_jsonl
from tools.llm import LlamaRunner
from tools.progress import log, progress
from tools.stages import EVAL_GENERAL

B = 1000


def _windows(tokens: list[int], ctx: int, max_tokens: int) -> list[list[int]]:
    toks = tokens[:max_tokens]
    return [toks[i:i + ctx] for i in range(0, len(toks), ctx) if len(toks[i:i + ctx]) >= 2]


def _nll_hf(model_dir: Path, text: str, ctx: int, max_tokens: int) -> list[tuple[float, int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(model_dir) / "adapter_config.json"
    if adapter.is_file():  # a trained stage's output/: the adapter on the base it names
        from peft import PeftModel
        base = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        tok = AutoTokenizer.from_pretrained(base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          str(model_dir)).eval()
    else:  # a folder, or a Hub id already in the local cache
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    wins = _windows(tok(text, add_special_tokens=False)["input_ids"], ctx, max_tokens)
    with progress("general text", total=len(wins), unit="windows") as advance:
        for w in wins:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].float(), -1)
            out.append((-float(sum(logp[j - 1, w[j]] for j in range(1, len(w)))), len(w) - 1))
            advance(1)
    return out


def _nll_gguf(gguf: Path, text: str, ctx: int, max_tokens: int, threads: int | None) -> list[tuple[float, int]]:
    out = []
    with LlamaRunner(gguf, n_ctx=ctx + 8, n_threads=threads) as lr:
        wins = _windows(lr.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), ctx, max_tokens)
        with progress("general text", total=len(wins), unit="windows") as advance:
            for w in wins:
                out.append((-lr.score([w[0]], [w[1:]])[0][0], len(w) - 1))
                advance(1)
    return out


def _ratio_ci(nll: np.ndarray, n: np.ndarray, seed: int = 0) -> list[float]:
    """95 % percentile interval of sum(nll) / sum(n) over windows resampled with replacement."""
    draws = np.random.default_rng(seed).integers(0, len(nll), size=(B, len(nll)))
    r = nll[draws].sum(1) / n[draws].sum(1)
    return [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]


def run_general(model: str | os.PathLike, out: str | os.PathLike | None = None, *, ctx: int = 256,
                max_tokens: int = 4096, threads: int | None = None, force: bool = False) -> Artifact:
    """Score the held-out general text; artifact ``eval.general`` (results.json, windows.jsonl)."""
    if ctx < 8 or max_tokens < ctx:
        raise UserError("--ctx must be at least 8 and --max-tokens at least --ctx", field="--ctx")
    m = Path(model)
    hub = not m.exists() and str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if not m.exists() and not hub:
        raise UserError("model not found", path=str(m), field="--model")
    # an HF folder (config.json, or a LoRA adapter folder) or Hub id; else a .gguf or a GGUF artifact folder
    hf = hub or (m.is_dir() and any((m / f).is_file() for f in ("config.json", "adapter_config.json")))
    if not hf:
        resolve_gguf(m, "--model")  # refused now, before anything is written
    text = heldout_text()
    out = Path(out) if out else Path("runs") / "eval" / f"general-{m.stem}"
    params = {"model": str(model) if hub else str(m.resolve()), "ctx": ctx, "max_tokens": max_tokens,
              "text_sha256": sha256_bytes(text)}
    inputs = [m] if m.is_file() or (m / "manifest.json").is_file() else []
    with Stage(EVAL_GENERAL, out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        rows = (_nll_hf(m, text, ctx, max_tokens) if hf else _nll_gguf(resolve_gguf(m, "--model"), text, ctx,
                                                                         max_tokens, threads))
        nll, n = np.array([r[0] for r in rows]), np.array([r[1] for r in rows], dtype=float)
        mean = float(nll.sum() / n.sum())
        lo, hi = _ratio_ci(nll, n)
        res = {"schema": 1, "model": params["model"], "text": {"source": SOURCE, "license": LICENSE,
                                                               "sha256": params["text_sha256"]},
               "ctx": ctx, "windows": len(rows), "tokens": int(n.sum()), "mean_nll": round(mean, 6),
               "mean_nll_ci95": [round(lo, 6), round(hi, 6)], "perplexity": round(math.exp(mean), 4),
               "perplexity_ci95": [round(math.exp(lo), 4), round(math.exp(hi), 4)],
               "interval": f"bootstrap over windows, {B} resamples, seed 0"}
        write_json(st.path("results.json"), res)
        write_jsonl(st.path("windows.jsonl"), [{"i": i, "nll": round(a, 6), "tokens": b} for i, (a, b) in enumerate(rows)])
        st.lineage.licenses.add(LICENSE)
        st.extra.update({"perplexity": res["perplexity"], "perplexity_ci95": res["perplexity_ci95"]})
    log(f"general: perplexity {st.result.extra['perplexity']} {st.result.extra['perplexity_ci95']}")
    return st.result


def paired_delta(base: str | os.PathLike, tuned: str | os.PathLike, seed: int = 0) -> dict:
    """Tuned minus base on the same windows: mean NLL difference and perplexity change in %, with
    95 % intervals from a paired bootstrap over windows, and the one-line verdict."""
    a, b = (read_artifact(d, stage=EVAL_GENERAL) for d in (base, tuned))
    if a.params.get("text_sha256") != b.params.get("text_sha256") or a.params.get("ctx") != b.params.get("ctx"):
        raise UserError("the two runs scored different text or windows", path=str(tuned), field="--general")
    wa, wb = (list(read_jsonl(x.path / "windows.jsonl")) for x in (a, b))
    if [w["tokens"] for w in wa] != [w["tokens"] for w in wb]:
        raise UserError("the two models cut the text into different windows (another tokenizer): not paired",
                        path=str(tuned), field="--general")
    na, nb = np.array([w["nll"] for w in wa]), np.array([w["nll"] for w in wb])
    n = np.array([w["tokens"] for w in wa], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(n), size=(B, len(n)))
    d = (nb[draws].sum(1) - na[draws].sum(1)) / n[draws].sum(1)
    dm = float((nb.sum() - na.sum()) / n.sum())
    pct = [100 * (math.exp(x) - 1) for x in (dm, float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5)))]
    verdict = (f"general ability: perplexity {pct[0]:+.1f} % [{pct[1]:+.1f}, {pct[2]:+.1f}] "
               f"({'worse' if pct[1] > 0 else 'better' if pct[2] < 0 else 'no clear change'} at 95 %)")
    return {"delta_mean_nll": round(dm, 6), "perplexity_change_pct": round(pct[0], 3),
            "perplexity_change_pct_ci95": [round(pct[1], 3), round(pct[2], 3)], "windows": len(n), "verdict": verdict}
