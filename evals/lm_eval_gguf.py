"""The lm-eval model ``medilora-gguf``: lm-eval's task machinery over a GGUF through our llama.cpp
scorer (tools.llm.LlamaRunner). lm-eval's own ``gguf`` backend talks to a server and is far slower
(docs/INTERNALS.md)."""
from __future__ import annotations

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import MODEL_REGISTRY, register_model

from tools.errors import WorkError
from tools.llm import LlamaRunner, common_prefix, log_softmax
from tools.progress import progress

GGUF_MODEL_NAME = "medilora-gguf"


def _contexts_by_task(requests) -> dict[str, list[str]]:
    """Each task's distinct contexts, in request order (one prompt evaluation per context)."""
    by_task: dict[str, list[str]] = {}
    for req in requests:
        by_task.setdefault(req.task_name or "", []).append(req.args[0])
    return {t: list(dict.fromkeys(c)) for t, c in by_task.items()}


class LlamaCppLM(LM):
    """One prompt evaluation per context, every continuation scored from it; per task the contexts'
    common token prefix is kept in the KV cache."""

    def __init__(self, pretrained: str, n_ctx: int = 4096, threads: int | None = None, seed: int = 0,
                 n_gpu_layers: int | None = None, **_):
        super().__init__()
        self.runner = LlamaRunner(pretrained, n_ctx=int(n_ctx), n_threads=int(threads) if threads else None,
                                  seed=int(seed), n_gpu_layers=n_gpu_layers)

    @property
    def tokenizer_name(self) -> str:
        return str(self.runner.path.name)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        r = self.runner
        slots: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            slots.setdefault(req.args[0], []).append(i)
        out: list = [None] * len(requests)
        with progress("lm-eval loglikelihood", total=len(slots), unit="contexts") as advance:
            for ctxs in _contexts_by_task(requests).values():
                r.set_prefix(common_prefix([r.tokenize(c) for c in ctxs]))
                for ctx in ctxs:
                    idx = [i for i in slots.pop(ctx, []) if out[i] is None]
                    if not idx:
                        continue
                    split = [r.split_continuation(ctx, requests[i].args[1]) for i in idx]
                    for i, res in zip(idx, r.score(split[-1][0], [cont for _, cont in split])):
                        out[i] = res
                    advance(1)
        if any(o is None for o in out):
            raise WorkError("internal: a request was not scored")
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        r = self.runner
        res = []
        for req in requests:
            (text,) = req.args
            toks = r.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            first = r.llm.token_bos() if r.llm.token_bos() >= 0 else r.llm.token_eos()
            seq = [first] + toks
            if len(seq) > r.n_ctx:
                raise WorkError(f"rolling loglikelihood: {len(seq)} tokens exceed n_ctx {r.n_ctx}")
            r.llm.reset()
            r._prefix_ok = False
            rows = r._rows_logits(seq[:-1], 0)
            res.append(float(np.sum([log_softmax(row)[t] for row, t in zip(rows, seq[1:])])))
            r.llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        return res

    def generate_until(self, requests, disable_tqdm: bool = False):
        r = self.runner
        res = []
        for req in requests:
            ctx, kw = req.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else until

            def stop(text, _u=until):
                return any(u in text for u in _u)
            text, _n, _why = r.generate(r.tokenize(ctx), max_tokens=int(kw.get("max_gen_toks", 256)),
                                        sampling={"temperature": float(kw.get("temperature", 0.0))},
                                        seed=0, decided=stop if until else None)
            for u in until:
                text = text.split(u)[0]
            res.append(text)
        return res

    def close(self):
        self.runner.close()


def registered() -> type[LlamaCppLM]:
    """The class under lm-eval's registry name (registered once)."""
    if GGUF_MODEL_NAME not in MODEL_REGISTRY:
        register_model(GGUF_MODEL_NAME)(LlamaCppLM)
    return MODEL_REGISTRY[GGUF_MODEL_NAME]
