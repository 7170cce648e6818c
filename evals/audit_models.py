"""The two kinds of model `tools audit` scores, behind one small interface: a GGUF through llama.cpp
(tools.llm.LlamaRunner: the file that ships) and an HF checkpoint through transformers (a merged
model, a full fine-tune, or an adapter on its base through peft: for comparison with the GGUF).

``score(prompt, continuations)`` returns, for each continuation, the summed log-probability of its
tokens after the prompt and whether every token is the arg-max given the ones before it: greedy
decoding from the prompt reproduces a continuation verbatim exactly when that flag is true, so the
extraction test needs no sampling loop. ``files`` are the weight files audited, with their sha256:
what `tools push` matches against the files it uploads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tools.errors import UserError
from tools.ggufpath import gguf_shards, resolve_gguf
from tools.io import sha256_file
from tools.llm import LlamaRunner

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
BATCH = 64


def _gguf_of(path: Path) -> Path | None:
    """The GGUF llama.cpp loads for MODEL (tools.ggufpath.resolve_gguf: a file, or a folder with one .gguf or one
    gguf-split set), None for an HF folder."""
    if (path.is_file() and path.suffix == ".gguf") or \
            (path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists()):
        return resolve_gguf(path, "MODEL")
    return None


class GGUFScorer:
    """A GGUF file (or a gguf artifact holding one) scored by llama.cpp; ``files`` are all its shards (what push
    uploads) when it is a gguf-split set."""

    kind = "gguf"

    def __init__(self, path: Path, n_ctx: int):
        self.runner = LlamaRunner(path, n_ctx=n_ctx)
        self.files = [{"name": p.name, "sha256": sha256_file(p)} for p in gguf_shards(self.runner.path)]
        self.name = self.runner.path.name

    def tokenize(self, text: str) -> list[int]:
        return self.runner.tokenize(text)

    def split(self, prefix: str, cont: str) -> tuple[list[int], list[int]]:
        return self.runner.split_continuation(prefix, cont)

    def score(self, prompt: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        return self.runner.score(prompt, conts)

    def close(self) -> None:
        self.runner.close()


class HFScorer:
    """An HF folder: a full model (config.json) or a LoRA adapter (adapter_config.json) on its base."""

    kind = "hf"

    def __init__(self, path: Path | str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.files = []
        if Path(path).is_dir():  # else a Hub id (a base model, from the local cache): no file of ours to vouch for
            path = Path(path)
            weights = sorted(p for p in path.iterdir() if p.name in HF_WEIGHTS or
                             (p.name.startswith("model-") and p.suffix == ".safetensors"))
            if not weights:
                raise UserError("no model weights (model*.safetensors or adapter_model.safetensors)", path=str(path),
                                field="MODEL")
            self.files = [{"name": p.name, "sha256": sha256_file(p)} for p in weights]
        self.name = Path(path).name if Path(path).is_dir() else str(path)
        tok_dir = path
        if Path(path).is_dir() and (path / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            self.model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            if not (path / "tokenizer_config.json").exists():
                tok_dir = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(tok_dir)
        self._torch = torch

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def split(self, prefix: str, cont: str) -> tuple[list[int], list[int]]:
        ctx, whole = self.tokenize(prefix), self.tokenize(prefix + cont)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, list(self.tok(cont, add_special_tokens=False)["input_ids"])

    def score(self, prompt: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        torch = self._torch
        out = []
        for i in range(0, len(conts), BATCH):
            chunk = conts[i:i + BATCH]
            width = len(prompt) + max(len(c) for c in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, c in enumerate(chunk):  # right padding: no position read depends on it
                ids[j, :len(prompt) + len(c)] = torch.tensor(prompt + c)
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)
            for j, c in enumerate(chunk):
                rows = logp[j, len(prompt) - 1:len(prompt) - 1 + len(c)]
                tgt = torch.tensor(c)
                out.append((float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())))
        return out

    def close(self) -> None:
        self.model = None


def open_scorer(path: str | Path, n_ctx: int = 1024, *, hub_ok: bool = False):
    """A GGUF (file or gguf artifact) or an HF folder (merge, full fine-tune, adapter, base-model artifact);
    with ``hub_ok`` (the base) also a Hub id such as ``meta-llama/Llama-3.2-1B-Instruct``."""
    p = Path(path)
    if not p.exists():
        if hub_ok and HUB_ID.match(str(path)):
            return HFScorer(str(path))
        raise UserError("model not found", path=str(p), field="--base" if hub_ok else "MODEL")
    gguf = _gguf_of(p)
    if gguf is not None:
        return GGUFScorer(gguf, n_ctx)
    if p.is_dir() and ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
        return HFScorer(p)
    raise UserError("expected a .gguf file, a gguf artifact or an HF model folder (config.json or "
                    "adapter_config.json)", path=str(p), field="MODEL")
