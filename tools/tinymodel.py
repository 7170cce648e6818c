"""A tiny random-weight Llama with a tokenizer trained here: a real HF checkpoint with no Hub.

ChatML chat template, ``<|im_end|>`` as end-of-turn and EOS. Used by the tests and the demo.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .artifact import Stage
from .paths import bundled_data
from .progress import log

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _training_text() -> list[str]:
    lines = []
    f = bundled_data() / "pubmedqa" / "dev.jsonl"
    with open(f, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= 200:
                break
            d = json.loads(line)
            lines.append(d["QUESTION"])
            lines.extend(d["CONTEXTS"])
            lines.append(d["LONG_ANSWER"])
    lines += ["yes", "no", "maybe", "Yes.", "No.", "Maybe.", "(A) (B) (C) (D) (E)"]
    return lines


def build_tokenizer(workdir: str | os.PathLike, vocab_size: int = 1024):
    """Train a sentencepiece BPE tokenizer (``tokenizer.model``) with ChatML special tokens.

    Sentencepiece rather than a byte-level BPE: llama.cpp's converter reads ``tokenizer.model``
    directly, while it refuses byte-level BPE tokenizers whose pre-tokenizer it does not know.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = workdir / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2,
        train_extremely_large_corpus=False)
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=False, add_bos_token=False,
                         add_eos_token=False, eos_token="<|im_end|>", pad_token="<pad>",
                         bos_token="<s>", unk_token="<unk>", add_prefix_space=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 2048
    return tok, Path(str(prefix) + ".model")


def build_tiny_llama(out: str | os.PathLike, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                     vocab_size: int = 1024) -> Path:
    """Write a tiny Llama checkpoint + tokenizer to ``out`` (deterministic for a seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, spm_file = build_tokenizer(out / ".spm", vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=tok.convert_tokens_to_ids("<s>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.convert_tokens_to_ids("<pad>"),
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not (out / "tokenizer.model").exists():
        shutil.copy(spm_file, out / "tokenizer.model")
    shutil.rmtree(out / ".spm", ignore_errors=True)
    return out


def tiny_base_model(out: str | os.PathLike, *, seed: int = 0, force: bool = False):
    """`tools base-model --tiny`: the tiny Llama as a ``base-model.tiny`` artifact."""
    with Stage("base-model.tiny", out, {"seed": seed}, force=force, log=log) as st:
        if not st.skipped:
            build_tiny_llama(st.work, seed=seed)
            st.lineage.licenses.add("MIT")
    return st.result
