"""A tiny random-weight Llama with a tokenizer trained here: a real HF checkpoint with no Hub.

ChatML chat template, ``<|im_end|>`` as end-of-turn and EOS. Used by the tests and the demo.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    from .paths import bundled_data
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


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    return fast


def build_tiny_llama(out: str | os.PathLike, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                     vocab_size: int = 1024) -> Path:
    """Write a tiny Llama checkpoint + tokenizer to ``out`` (deterministic for a seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=None,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
