"""The quantization gap: perplexity of a reference and a quantized GGUF on the same tokens, and the
mean KL divergence of the quantized model's next-token distribution from the reference's.

Both models run through llama-cpp-python with ``logits_all=True``. The text is tokenized once (with
the reference's tokenizer; the quantized model must tokenize it identically) and cut into windows
of ``ctx`` tokens, each evaluated from an empty context; every next-token prediction inside a
window is scored.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from tools.artifact import Stage
from tools.errors import UserError
from tools.ggufpath import default_threads
from tools.io import require_file, write_json
from tools.llamacpp import load
from tools.paths import bundled_data
from tools.plotting import pyplot, save_png
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
    return load(path, n_gpu_layers=n_gpu_layers, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, seed=0)


def _window_logprobs(llm, tokens):
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    return _log_softmax(np.array(llm.scores[: len(tokens)], dtype=np.float32))


@dataclass(frozen=True)
class Scoring:
    """How the gap is measured: windows of ``ctx`` tokens, the first ``max_tokens`` of the text (all when
    None), llama.cpp threads and GPU layers (None: the defaults of ``tools.llamacpp.load``)."""
    ctx: int = 512
    max_tokens: int | None = None
    threads: int | None = None
    n_gpu_layers: int | None = None

    def checked(self) -> Scoring:
        if self.ctx < 8:
            raise UserError("--ctx must be at least 8", field="--ctx")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise UserError("--max-tokens must be at least 2", field="--max-tokens")
        return replace(self, threads=default_threads(self.threads))


class Reference:
    """The reference model's next-token log-probabilities on the text's windows, computed once and kept as
    float32 ``.npy`` files in ``cache`` (a folder the caller owns), so that any number of quantized files
    can be scored against them (:meth:`score`) without re-running the reference."""

    def __init__(self, ref: Path, text_file: Path, scoring: Scoring, cache: Path):
        import numpy as np

        self.ref, self.scoring, self.cache, self.text = Path(ref), scoring.checked(), Path(cache), read_text(text_file)
        self.text_file = Path(text_file)
        self.add_bos = bool(read_gguf(self.ref, tensors=False)["metadata"].get("tokenizer.ggml.add_bos_token", True))
        self.cache.mkdir(parents=True, exist_ok=True)
        s = self.scoring
        rl = _load(self.ref, s.ctx, s.threads, s.n_gpu_layers)
        try:
            self.tokens = rl.tokenize(self.text.encode("utf-8"), add_bos=self.add_bos, special=False)
            toks = self.tokens[: s.max_tokens] if s.max_tokens else self.tokens
            if len(toks) < 2:
                raise UserError("text too short: fewer than 2 tokens", path=str(text_file))
            self.windows = [w for w in (toks[i:i + s.ctx] for i in range(0, len(toks), s.ctx)) if len(w) >= 2]
            with progress("reference log-probabilities", total=sum(map(len, self.windows)), unit="tokens") as adv:
                for i, w in enumerate(self.windows):
                    np.save(self.cache / f"ref-{i}.npy", _window_logprobs(rl, w).astype(np.float32))
                    adv(len(w))
            self.n_gpu_layers = rl.medilora_load["n_gpu_layers"]
        finally:
            rl.close()

    def logprobs(self, i: int):
        import numpy as np
        return np.load(self.cache / f"ref-{i}.npy").astype(np.float64)

    def score(self, quant: Path, label: str = "compare-quant") -> dict:
        """Per-token figures of ``quant`` against the reference: arrays ``kl``, ``nll_ref``, ``nll_quant``
        and the count of top-1 agreements (:func:`gap_figures` turns them into the reported figures)."""
        import numpy as np

        s = self.scoring
        ql = _load(Path(quant), s.ctx, s.threads, s.n_gpu_layers)
        nll_r, nll_q, kls, agree = [], [], [], 0
        try:
            if ql.tokenize(self.text.encode("utf-8"), add_bos=self.add_bos, special=False) != self.tokens:
                raise UserError("the two GGUFs tokenize the text differently: not the same model", path=str(quant))
            with progress(label, total=sum(map(len, self.windows)), unit="tokens") as advance:
                for i, w in enumerate(self.windows):
                    lr, lq = self.logprobs(i), _window_logprobs(ql, w)
                    nxt, pos = np.array(w[1:]), np.arange(len(w) - 1)
                    nll_r.append(-lr[pos, nxt])
                    nll_q.append(-lq[pos, nxt])
                    kl, same = next_token_gap(lr[:-1], lq[:-1])
                    kls.append(kl)
                    agree += int(same.sum())
                    advance(len(w))
        finally:
            ql.close()
        return {"kl": np.concatenate(kls), "nll_ref": np.concatenate(nll_r), "nll_quant": np.concatenate(nll_q),
                "agree": agree}


def next_token_gap(ref, other):
    """Per position: KL(ref || other) in nats, with ``ref`` the distribution p that ``other`` (q) is judged
    against, sum p (log p - log q); and whether both put their highest probability on the same token.
    The rows of ``ref`` and ``other`` are next-token log-probabilities over one vocabulary."""
    import numpy as np

    kl = (np.exp(ref) * (ref - other)).sum(axis=-1).clip(min=0.0)
    return kl, ref.argmax(-1) == other.argmax(-1)


def mean_ci95(x, block: int = 32) -> list[float]:
    """95 % interval of the mean of a per-token series by batch means: neighbouring tokens are correlated,
    so the series is cut into blocks of ``block`` tokens and the interval is taken over the block means."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    n = len(x) // block
    if n < 2:
        return [float(x.mean()), float(x.mean())]
    means = x[: n * block].reshape(n, block).mean(axis=1)
    half = 1.96 * means.std(ddof=1) / math.sqrt(n)
    return [float(f"{x.mean() - half:.6g}"), float(f"{x.mean() + half:.6g}")]


def gap_figures(g: dict) -> dict:
    """The reported figures of :meth:`Reference.score`'s arrays: perplexities, KL statistics, top-1."""
    import numpy as np

    kl, n = g["kl"], len(g["kl"])
    ref_ppl, q_ppl = math.exp(float(np.mean(g["nll_ref"]))), math.exp(float(np.mean(g["nll_quant"])))
    r6 = lambda x: float(f"{float(x):.6g}")  # noqa: E731 - six significant digits (a Q8_0's KL is ~1e-6)
    return {"tokens_scored": n, "ref_perplexity": r6(ref_ppl), "quant_perplexity": r6(q_ppl),
            "perplexity_ratio": r6(q_ppl / ref_ppl), "perplexity_delta_pct": r6(100 * (q_ppl / ref_ppl - 1)),
            "mean_kl": r6(kl.mean()), "mean_kl_ci95": mean_ci95(kl), "median_kl": r6(np.median(kl)),
            "p99_kl": r6(np.quantile(kl, 0.99)), "max_kl": r6(kl.max()), "top1_agreement": r6(g["agree"] / n)}


def compare_quant(ref: str | os.PathLike, quant: str | os.PathLike, text_file: str | os.PathLike,
                  out: str | os.PathLike, scoring: Scoring = Scoring(), *, force: bool = False):
    """Write artifact ``out`` (stage ``compare-quant``): results.json and kl.png."""
    ref, quant = Path(ref), Path(quant)
    rinfo, qinfo = read_gguf(ref, tensors=False), read_gguf(quant, tensors=False)
    read_text(text_file)
    scoring = scoring.checked()
    params = {"ctx": scoring.ctx, "max_tokens": scoring.max_tokens}
    with Stage("compare-quant", out, params, inputs=[ref, quant, Path(text_file)], force=force, log=log) as st:
        if st.skipped:
            return st.result
        with tempfile.TemporaryDirectory(prefix="ref-logprobs-") as cache:
            r = Reference(ref, Path(text_file), scoring, Path(cache))
            g = r.score(quant)
        f = gap_figures(g)
        results = {
            "ref": {"file": ref.name, "file_type": rinfo["file_type"], "size_bytes": rinfo["size_bytes"],
                    "bits_per_weight": rinfo["bits_per_weight"], "perplexity": f.pop("ref_perplexity")},
            "quant": {"file": quant.name, "file_type": qinfo["file_type"], "size_bytes": qinfo["size_bytes"],
                      "bits_per_weight": qinfo["bits_per_weight"], "perplexity": f.pop("quant_perplexity")},
            "text": Path(text_file).name, "windows": len(r.windows), "ctx": scoring.ctx, **f,
            "size_ratio": round(qinfo["size_bytes"] / rinfo["size_bytes"], 6), "n_gpu_layers": r.n_gpu_layers,
        }
        write_json(st.path("results.json"), results)
        _plot(g["kl"], results, st.path("kl.png"))
        st.extra.update({k: results[k] for k in ("mean_kl", "perplexity_ratio", "top1_agreement", "tokens_scored")})
        st.extra.update({"ref_perplexity": results["ref"]["perplexity"], "quant_perplexity": results["quant"]["perplexity"],
                         "ref_file": ref.name, "quant_file": quant.name, "quant_type": qinfo["file_type"]})
    return st.result


def _plot(kl, results: dict, path: Path) -> None:
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
    rows = []
    with open(bundled_data() / "pubmedqa" / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            if len(rows) >= n_items:
                break
            rows.append(" ".join(json.loads(line)["CONTEXTS"]))
    return "\n\n".join(rows) + "\n"
