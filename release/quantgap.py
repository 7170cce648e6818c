"""The quantization gap: perplexity of a reference and a quantized GGUF on the same tokens, and the
mean KL divergence of the quantized model's next-token distribution from the reference's.

Both models run through llama-cpp-python with ``logits_all=True``. The text is tokenized once (with
the reference's tokenizer; the quantized model must tokenize it identically) and cut into windows
of ``ctx`` tokens, each evaluated from an empty context; every next-token prediction inside a
window is scored.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from tools.artifact import Stage
from tools.errors import UserError
from tools.ggufpath import default_threads
from tools.io import require_file, write_json
from tools.progress import log, progress

from .ggufinfo import read_gguf


def read_text(path: str | os.PathLike) -> str:
    p = require_file(path, "text file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 (byte 0x{raw[e.start]:02x})", path=str(p), line=line) from None
    if not text.strip():
        raise UserError("text file holds no text", path=str(p))
    return text


def _log_softmax(x):
    import numpy as np

    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _load(path: Path, ctx: int, threads: int, n_gpu_layers: int | None = None):
    from tools.llamacpp import load

    return load(path, n_gpu_layers=n_gpu_layers, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, seed=0)


def _window_logprobs(llm, tokens):
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    return _log_softmax(np.array(llm.scores[: len(tokens)], dtype=np.float32))


def compare_quant(ref: str | os.PathLike, quant: str | os.PathLike, text_file: str | os.PathLike,
                  out: str | os.PathLike, *, ctx: int = 512, max_tokens: int | None = None,
                  threads: int | None = None, force: bool = False, n_gpu_layers: int | None = None):
    """Write artifact ``out`` (stage ``compare-quant``): results.json and kl.png."""
    import numpy as np

    ref, quant = Path(ref), Path(quant)
    rinfo, qinfo = read_gguf(ref, tensors=False), read_gguf(quant, tensors=False)
    text = read_text(text_file)
    if ctx < 8:
        raise UserError("--ctx must be at least 8", field="--ctx")
    if max_tokens is not None and max_tokens < 2:
        raise UserError("--max-tokens must be at least 2", field="--max-tokens")
    threads = default_threads(threads)
    params = {"ctx": ctx, "max_tokens": max_tokens}
    with Stage("compare-quant", out, params, inputs=[ref, quant, Path(text_file)], force=force, log=log) as st:
        if st.skipped:
            return st.result
        rl = _load(ref, ctx, threads, n_gpu_layers)
        ql = _load(quant, ctx, threads, n_gpu_layers)
        try:
            add_bos = bool(rinfo["metadata"].get("tokenizer.ggml.add_bos_token", True))
            toks = rl.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
            qtoks = ql.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
            if toks != qtoks:
                raise UserError("the two GGUFs tokenize the text differently: not the same model", path=str(quant))
            if max_tokens:
                toks = toks[:max_tokens]
            if len(toks) < 2:
                raise UserError("text too short: fewer than 2 tokens", path=str(text_file))
            windows = [toks[i:i + ctx] for i in range(0, len(toks), ctx)]
            windows = [w for w in windows if len(w) >= 2]
            nll_r, nll_q, kls, agree = [], [], [], 0
            with progress("compare-quant", total=sum(len(w) for w in windows), unit="tokens") as advance:
                for w in windows:
                    lr = _window_logprobs(rl, w)
                    lq = _window_logprobs(ql, w)
                    nxt = np.array(w[1:])
                    pos = np.arange(len(w) - 1)
                    nll_r.extend((-lr[pos, nxt]).tolist())
                    nll_q.extend((-lq[pos, nxt]).tolist())
                    a, b = lr[:-1], lq[:-1]
                    kls.extend((np.exp(a) * (a - b)).sum(axis=-1).clip(min=0.0).tolist())
                    agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                    advance(len(w))
        finally:
            rl.close()
            ql.close()
        n = len(kls)
        kl = np.array(kls)
        ref_ppl = math.exp(float(np.mean(nll_r)))
        q_ppl = math.exp(float(np.mean(nll_q)))
        r6 = lambda x: round(float(x), 6)  # noqa: E731
        results = {
            "ref": {"file": ref.name, "file_type": rinfo["file_type"], "size_bytes": rinfo["size_bytes"],
                    "bits_per_weight": rinfo["bits_per_weight"], "perplexity": r6(ref_ppl)},
            "quant": {"file": quant.name, "file_type": qinfo["file_type"], "size_bytes": qinfo["size_bytes"],
                      "bits_per_weight": qinfo["bits_per_weight"], "perplexity": r6(q_ppl)},
            "text": Path(text_file).name, "tokens_scored": n, "windows": len(windows), "ctx": ctx,
            "perplexity_ratio": r6(q_ppl / ref_ppl), "perplexity_delta_pct": r6(100 * (q_ppl / ref_ppl - 1)),
            "mean_kl": r6(kl.mean()), "median_kl": r6(np.median(kl)), "p99_kl": r6(np.quantile(kl, 0.99)),
            "max_kl": r6(kl.max()), "top1_agreement": r6(agree / n),
            "size_ratio": r6(qinfo["size_bytes"] / rinfo["size_bytes"]),
            "n_gpu_layers": rl.medilora_load["n_gpu_layers"],
        }
        write_json(st.path("results.json"), results)
        _plot(kl, results, st.path("kl.png"))
        st.extra.update({k: results[k] for k in ("mean_kl", "perplexity_ratio", "top1_agreement", "tokens_scored")})
        st.extra.update({"ref_perplexity": results["ref"]["perplexity"], "quant_perplexity": results["quant"]["perplexity"],
                         "ref_file": ref.name, "quant_file": quant.name, "quant_type": qinfo["file_type"]})
    return st.result


def _plot(kl, results: dict, path: Path) -> None:
    from tools.plotting import pyplot, save_png

    plt = pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    vals = np.clip(kl, 1e-6, None)
    bins = np.logspace(-6, max(0.0, math.log10(vals.max()) + 0.1), 40)
    ax.hist(vals, bins=bins, color="#4477aa")
    ax.set_xscale("log")
    ax.axvline(float(kl.mean()), color="#cc3311", linestyle="--", label=f"mean KL {results['mean_kl']:.4f}")
    ax.set_xlabel("KL(ref || quant) per token (nats)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{results['quant']['file_type']} vs {results['ref']['file_type']}: ppl "
                 f"{results['ref']['perplexity']:.2f} -> {results['quant']['perplexity']:.2f}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def heldout_text(n_items: int = 6) -> str:
    """Held-out medical text shipped with the product: the abstracts of the first PubMedQA *test* items
    (never trained on: SFT uses the train split), for the quantization table and the fidelity gate."""
    import json

    from tools.paths import bundled_data

    rows = []
    with open(bundled_data() / "pubmedqa" / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            if len(rows) >= n_items:
                break
            rows.append(" ".join(json.loads(line)["CONTEXTS"]))
    return "\n\n".join(rows) + "\n"
