"""Turn a GGUF into a plain HF checkpoint (no Hub): transformers dequantizes it into torch."""
from __future__ import annotations

import os
from pathlib import Path

from .artifact import Stage
from .paths import embedded_gguf


def gguf_to_hf(gguf: str | os.PathLike | None, out: str | os.PathLike, *, force: bool = False, log=None):
    """Write ``out`` as an artifact holding the HF form of ``gguf`` (default: the embedded SmolLM2)."""
    gguf = Path(gguf) if gguf else embedded_gguf()
    with Stage("hf-from-gguf", out, {"gguf": gguf.name}, inputs=[gguf], force=force, log=log) as st:
        if st.skipped:
            return st.result
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = dict(gguf_file=gguf.name)
        try:  # older transformers needed it spelled out; 5.x always dequantizes and has no GgufConfig
            from transformers import GgufConfig
            kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        model.save_pretrained(st.work, safe_serialization=True)
        tok.save_pretrained(st.work)
        st.lineage.licenses.add("Apache-2.0")
        st.lineage.sources.add(f"SmolLM2 GGUF {gguf.name}")
    return st.result
