"""Perplexity over answer tokens only (prompt tokens masked, as in SFT training).

For each ChatML item the prompt is every message but the last assistant turn, rendered with the
model's own chat template plus the generation prompt; the target is the rest of the fully rendered
conversation (the answer and its end-of-turn token, as Axolotl trains with ``train_on_eos: turn``).
Mean cross-entropy is token-weighted over all answer tokens; perplexity = exp(mean CE).
Models: an HF folder (transformers, float32) or a GGUF file (llama-cpp-python, logits of every
position).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.artifact import Stage, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl
from tools.llamacpp import load


@dataclass
class PPL:
    model: str
    n_items: int
    n_tokens: int
    mean_ce: float
    perplexity: float

    def to_dict(self):
        return asdict(self)


def load_items(data: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    p = Path(data)
    if p.is_dir():
        art = read_artifact(p, stage="dataset")
        f = p / f"{split}.jsonl"
        if not f.exists():
            avail = ", ".join(sorted(x.stem for x in p.glob("*.jsonl")))
            raise UserError(f"dataset has no {split!r} split (has: {avail})", path=str(art.path), field="--split")
    else:
        f = p
    items = []
    for i, row in enumerate(read_jsonl(f, required=("messages",))):
        msgs = row["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise UserError("last message must be the assistant's answer", path=str(f), line=i + 1, field="messages")
        items.append(row)
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError("no items", path=str(f))
    return items


def _split_prompt_answer(render, messages: list[dict]) -> tuple[str, str]:
    prompt = render(messages[:-1], add_generation_prompt=True)
    full = render(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise UserError("chat template does not extend the prompt with the answer", field="chat_template")
    return prompt, full[len(prompt):]


def perplexity_hf(model_dir: str | Path, items: list[dict], max_len: int = 2048) -> PPL:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise UserError("tokenizer has no chat template", path=str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    def render(msgs, add_generation_prompt):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    nll, n = 0.0, 0
    with torch.no_grad():
        for it in items:
            prompt, answer = _split_prompt_answer(render, it["messages"])
            p_ids = tok.encode(prompt, add_special_tokens=False)
            a_ids = tok.encode(answer, add_special_tokens=False)
            ids = (p_ids + a_ids)[-max_len:]
            n_ans = min(len(a_ids), len(ids) - 1)
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            tgt = x[0, 1:]
            tok_lp = logp.gather(1, tgt[:, None])[:, 0]
            nll -= float(tok_lp[-n_ans:].sum())
            n += n_ans
    ce = nll / max(n, 1)
    return PPL(str(model_dir), len(items), n, ce, math.exp(ce))


def perplexity_gguf(gguf: str | Path, items: list[dict], n_ctx: int = 2048, threads: int | None = None,
                    n_gpu_layers: int | None = None) -> PPL:
    import numpy as np
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    llm = load(gguf, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, logits_all=True, n_threads=threads)
    try:
        tmpl = llm.metadata.get("tokenizer.chat_template")
        if not tmpl:
            raise UserError("GGUF has no chat template", path=str(gguf))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(tmpl)
        eos = llm._model.token_get_text(llm.token_eos()) if hasattr(llm._model, "token_get_text") else ""

        def render(msgs, add_generation_prompt):
            return template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                   eos_token=eos, bos_token="")

        nll, n = 0.0, 0
        for it in items:
            prompt, answer = _split_prompt_answer(render, it["messages"])
            p_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            a_ids = llm.tokenize(answer.encode(), add_bos=False, special=True)
            ids = (p_ids + a_ids)[-(n_ctx - 1):]
            n_ans = min(len(a_ids), len(ids) - 1)
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
            m = logits.max(axis=1, keepdims=True)
            logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
            pos = np.arange(len(ids) - 1)
            lp = logits[pos, ids[1:]] - logz[:-1]
            nll -= float(lp[-n_ans:].sum())
            n += n_ans
    finally:
        llm.close()
    ce = nll / max(n, 1)
    return PPL(str(gguf), len(items), n, ce, math.exp(ce))


def perplexity(model: str | Path, items: list[dict], n_gpu_layers: int | None = None, **kw) -> PPL:
    """Dispatch on the model's form: a GGUF file or an HF model folder."""
    p = Path(model)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError("not a GGUF file", path=str(p))
        return perplexity_gguf(p, items, n_gpu_layers=n_gpu_layers, **kw)
    if p.is_dir() and (p / "config.json").is_file():
        return perplexity_hf(p, items)
    raise UserError("model must be a GGUF file or an HF model folder (with config.json)", path=str(p))


def run_perplexity(models: list[str], data: str | Path, *, split: str = "test", limit: int | None = None,
                   out: str | Path | None = None, force: bool = False, n_gpu_layers: int | None = None) -> list[dict]:
    """`tools eval perplexity`: one row per model; with ``out`` also artifact ``eval.perplexity``."""
    items = load_items(data, split, limit)
    if not out:
        return [perplexity(m, items, n_gpu_layers=n_gpu_layers).to_dict() for m in models]
    out = Path(out)
    params = {"split": split, "limit": limit, "models": [Path(m).name for m in models]}
    with Stage("eval.perplexity", out, params, inputs=[*models, data], force=force) as st:
        if st.skipped:
            return json.loads((out / "results.json").read_text())["models"]
        results = [perplexity(m, items, n_gpu_layers=n_gpu_layers).to_dict() for m in models]
        st.path("results.json").write_text(json.dumps({"split": split, "models": results}, indent=2, sort_keys=True))
        st.extra["perplexity"] = {r["model"]: r["perplexity"] for r in results}
    return results
