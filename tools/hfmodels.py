"""Turn a GGUF into a plain HF checkpoint (no Hub): transformers dequantizes it into torch."""
from __future__ import annotations

import contextlib
import functools
import json
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
        with _gguf_read_once():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
            model.save_pretrained(st.work, safe_serialization=True)
            tok.save_pretrained(st.work)
            _repair_byte_level_bpe(st.work, gguf)
        st.lineage.licenses.add("Apache-2.0")
        st.lineage.sources.add(f"SmolLM2 GGUF {gguf.name}")
    return st.result


@contextlib.contextmanager
def _gguf_read_once():
    """transformers 5 parses the GGUF with gguf-py's reader once for the config, twice for the tokenizer and once
    for the weights, and builds gguf's tensor-name map once per module: for SmolLM2 five parses of its 49k-token
    vocabulary and ~400 maps, over half of the conversion (docs/CPU_FACTS.md). Both are pure functions of their
    arguments (the reader maps the file read-only), so within this block each is computed once."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    read = functools.lru_cache(maxsize=4)(lambda path, mode="r": reader(path, mode))
    gguf.GGUFReader = lambda path, mode="r": read(str(path), mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


# Digits-then-ByteLevel pre-tokenizers, as llama.cpp names them (tokenizer.ggml.pre)
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")


def _repair_byte_level_bpe(work: Path, gguf: Path) -> None:
    """transformers 5 loads a GGUF byte-level BPE vocab (``tokenizer.ggml.model == "gpt2"``, SmolLM2's)
    as a byte-fallback BPE with a sentencepiece-style decoder and eos = <|im_start|>. llama.cpp's
    converter then takes it for a sentencepiece vocab and writes a GGUF whose tokenizer aborts. Rebuild
    ``tokenizer.json`` with the tokenizers library from the GGUF's own tokens and merges."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))

    def val(key):
        f = r.get_field(key)
        return f.contents() if f is not None else None

    tj_path = work / "tokenizer.json"
    if val("tokenizer.ggml.model") != "gpt2" or not tj_path.is_file():
        return
    if not json.loads(tj_path.read_text(encoding="utf-8")).get("model", {}).get("byte_fallback"):
        return  # transformers got it right
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, merges, types = val("tokenizer.ggml.tokens"), val("tokenizer.ggml.merges"), val("tokenizer.ggml.token_type")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     byte_fallback=False, fuse_unk=False)
    tk = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if val("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if int(ty) == 3])  # CONTROL tokens
    tk.save(str(tj_path))
    cfg_path = work / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for name in ("bos", "eos", "unknown", "padding"):
        i = val(f"tokenizer.ggml.{name}_token_id")
        key = {"unknown": "unk", "padding": "pad"}.get(name, name)
        if i is not None:
            cfg[f"{key}_token"] = tokens[int(i)]
            cfg.pop(f"{key}_token_id", None)
    cfg["add_bos_token"] = bool(val("tokenizer.ggml.add_bos_token"))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
