"""Laptop fit: the memory a GGUF needs at a context size, from the GGUF's own metadata.

needed(ctx) = weights (the tensor bytes llama.cpp loads) + KV cache (``block_count`` x ctx x
(``head_count_kv`` x key_length + ``head_count_kv`` x value_length) x bytes of the KV type, f16 unless
told) + the runtime (llama.cpp's own tables and scratch: a base plus a share per vocabulary entry, both
measured, see docs/CPU_FACTS.md; tens of MB, which matters only for small models). llama.cpp clears its
KV buffer when it makes the context, so all of it is resident from the start; the compute buffer is
reserved for a whole batch of logits but only the part a decode touches becomes resident. Checked against
the RSS of a real load and decode in a child process (:func:`measure_rss`, ``use_mmap=False``: weights
counted once) by tests/release/test_fit.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tools.errors import UserError, WorkError

from .ggufinfo import parse_size

CONTEXTS = (2048, 4096, 8192, 16384, 32768)
# measured on this llama.cpp (0.3.36) by RSS after load + decode (docs/CPU_FACTS.md): tiny Llama (vocab 1024)
# 5.8 MB, SmolLM2-135M (vocab 49152) 26.8 MB beyond weights + KV, at every context size
RUNTIME_BASE = 5_300_000
RUNTIME_PER_VOCAB = 437
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


def runtime_bytes(shape: dict) -> int:
    return RUNTIME_BASE + RUNTIME_PER_VOCAB * shape["n_vocab"]


def needed_bytes(shape: dict, ctx: int, kv_type: str = "F16") -> int:
    return shape["weights_bytes"] + kv_bytes(shape, ctx, kv_type) + runtime_bytes(shape)


def memory_figures(info: dict, contexts=CONTEXTS, kv_type: str = "F16") -> dict:
    """What every GGUF artifact records (``extra.memory``): bytes needed at each context size."""
    s = shape_of(info)
    ctxs = [c for c in contexts if not s["train_context"] or c <= s["train_context"]] or [min(contexts)]
    return {"kv_type": kv_type, "weights_bytes": s["weights_bytes"],
            "kv_bytes_per_token": kv_bytes(s, 1, kv_type), "train_context": s["train_context"],
            "runtime_bytes": runtime_bytes(s),
            "needed_bytes": {str(c): needed_bytes(s, c, kv_type) for c in ctxs}}


def largest_context(info: dict, ram: int, kv_type: str = "F16", step: int = 256) -> int:
    """The largest context (a multiple of ``step``, at most the trained one) whose needs fit in ``ram``
    bytes; 0 when not even ``step`` tokens fit."""
    s = shape_of(info)
    per = kv_bytes(s, 1, kv_type)
    free = ram - s["weights_bytes"] - runtime_bytes(s)
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


_RSS_CHILD = """
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))
import llama_cpp
from tools.llamacpp import load
llama_cpp.llama_backend_init()
before = rss()
llm = load(sys.argv[1], n_ctx=int(sys.argv[2]), use_mmap=False, n_threads=1, n_threads_batch=1)
llm.eval(llm.tokenize(b"The patient was admitted with chest pain and shortness of breath. " * 4))
print(json.dumps({"before": before, "after": rss()}))
"""


def measure_rss(gguf: str | os.PathLike, ctx: int) -> int:
    """Resident bytes a real llama.cpp load (no mmap) + a short decode adds, in a fresh child process."""
    p = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(gguf), str(ctx)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if p.returncode != 0:
        raise WorkError(f"the measuring load of {gguf} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    return d["after"] - d["before"]
