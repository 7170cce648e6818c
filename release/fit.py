"""Laptop fit: the memory a GGUF needs at a context size, from the GGUF's own metadata.

needed(ctx) = weights (the tensor bytes llama.cpp loads) + KV cache (``block_count`` x ctx x
(``head_count_kv`` x key_length + ``head_count_kv`` x value_length) x bytes of the KV type, f16 unless
told) + the logits row (n_vocab float32). llama.cpp clears its KV buffer when it makes the context, so
all of it is resident from the start; the compute buffer is allocated for a whole batch but only the part
a decode touches becomes resident (small for the short prompts of a chat turn). Checked against the RSS of
a real load and decode in tests/release/test_fit.py (``use_mmap=False``: weights counted once).
"""
from __future__ import annotations

from tools.errors import UserError

from .ggufinfo import parse_size

CONTEXTS = (2048, 4096, 8192, 16384, 32768)
KV_BYTES = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q5_1": 24 / 32, "Q5_0": 22 / 32,
            "Q4_1": 20 / 32, "Q4_0": 18 / 32, "IQ4_NL": 18 / 32}


def _first(v):
    """A per-layer array (some architectures) -> its largest value; a scalar as it is."""
    if isinstance(v, (list, tuple)):
        return max(int(x) for x in v) if v else 0
    return int(v)


def shape_of(info: dict) -> dict:
    """The figures the KV cache depends on, read from ``read_gguf`` metadata (``<arch>.*`` keys)."""
    meta, arch = info["metadata"], info["architecture"]

    def key(k, default=None):
        v = meta.get(f"{arch}.{k}", default)
        if v is None:
            raise UserError(f"GGUF metadata has no {arch}.{k}: cannot size its KV cache", path=info["file"])
        return v

    n_embd, n_head = int(key("embedding_length")), _first(key("attention.head_count"))
    n_head_kv = _first(key("attention.head_count_kv", n_head))
    head = n_embd // max(n_head, 1)
    tensor_bytes = sum(h["bytes"] for h in info["tensor_types"].values())
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    n_vocab = int(vocab) if isinstance(vocab, int) else int(str(vocab).split()[2]) if vocab else 0
    return {"layers": int(key("block_count")), "head_count_kv": n_head_kv,
            "key_length": int(meta.get(f"{arch}.attention.key_length", head)),
            "value_length": int(meta.get(f"{arch}.attention.value_length", head)),
            "train_context": int(meta.get(f"{arch}.context_length", 0)), "weights_bytes": tensor_bytes,
            "n_vocab": n_vocab}


def kv_bytes(shape: dict, ctx: int, kv_type: str = "F16") -> int:
    per_tok = shape["layers"] * shape["head_count_kv"] * (shape["key_length"] + shape["value_length"])
    return int(per_tok * ctx * KV_BYTES[kv_type.upper()])


def needed_bytes(shape: dict, ctx: int, kv_type: str = "F16") -> int:
    return shape["weights_bytes"] + kv_bytes(shape, ctx, kv_type) + 4 * shape["n_vocab"]


def memory_figures(info: dict, contexts=CONTEXTS, kv_type: str = "F16") -> dict:
    """What every GGUF artifact records (``extra.memory``): bytes needed at each context size."""
    s = shape_of(info)
    ctxs = [c for c in contexts if not s["train_context"] or c <= s["train_context"]] or [min(contexts)]
    return {"kv_type": kv_type, "weights_bytes": s["weights_bytes"],
            "kv_bytes_per_token": kv_bytes(s, 1, kv_type), "train_context": s["train_context"],
            "needed_bytes": {str(c): needed_bytes(s, c, kv_type) for c in ctxs}}


def largest_context(info: dict, ram: int, kv_type: str = "F16", step: int = 256) -> int:
    """The largest context (a multiple of ``step``, at most the trained one) whose needs fit in ``ram``
    bytes; 0 when not even ``step`` tokens fit."""
    s = shape_of(info)
    per = kv_bytes(s, 1, kv_type)
    free = ram - s["weights_bytes"] - 4 * s["n_vocab"]
    if free < per * step:
        return 0
    n = free // max(per, 1) // step * step
    return int(min(n, s["train_context"]) if s["train_context"] else n)


def parse_ram(text: str, field: str = "--ram") -> int:
    return parse_size(text, field=field)


def fit_line(memory: dict) -> str:
    """The card's row: 'runs in X GB at N tokens' for each recorded context size."""
    parts = [f"{b / 1e9:.2f} GB at {int(c):,} tokens" for c, b in memory["needed_bytes"].items()]
    return f"runs in {'; '.join(parts)} (weights + {memory['kv_type']} KV cache)"
