"""The llama.cpp side of the benchmarks: one GGUF, scored and sampled through llama-cpp-python.

- The prompt is the GGUF's own chat template (ChatML for SmolLM2) rendered with
  llama-cpp-python's Jinja2 formatter, tokenized by llama.cpp with special tokens.
- The system-prompt prefix is evaluated once and kept in the KV cache; every item evaluates only
  its own suffix from there (always from the same prefix, so an item's numbers never depend on the
  item before it).
- Log-likelihood: the prompt is evaluated once; the first token of every option is scored from
  the prompt's last logits (read through the context with ``llama_get_logits_ith``: without
  ``logits_all`` llama-cpp-python 0.3.36 never fills ``Llama.scores``), the rest of a multi-token
  option in one extra batch, after which the cache is rolled back to the prompt.
- Generation: llama-cpp-python's sampler (top-k 40 and its other defaults), seeded per item,
  stopped as soon as the caller says the answer is decided.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

import numpy as np

from tools.errors import UserError, WorkError
from tools.ggufpath import default_threads, physical_cores, resolve_gguf  # noqa: F401 - physical_cores for bench/
from tools.llamacpp import load

SENTINEL = "\u2063MEDILORA_USER\u2063"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# llama-cpp-python's own sampling defaults (Llama.create_completion), with the protocol's top-k 40
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1.0,
                     "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def item_seed(seed: int, item_id: str) -> int:
    """A per-item sampling seed: the same item gets the same draw whatever else is in the run."""
    h = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def common_prefix(token_lists: list[list[int]]) -> list[int]:
    """The tokens every list starts with, less one so that each prompt keeps a token of its own to
    evaluate (a prompt equal to the prefix would leave no logits to score from)."""
    if not token_lists:
        return []
    pre = token_lists[0]
    for t in token_lists[1:]:
        n = 0
        while n < min(len(pre), len(t)) and pre[n] == t[n]:
            n += 1
        pre = pre[:n]
    return list(pre[: max(0, min(len(t) for t in token_lists) - 1)])


class LlamaRunner:
    """One llama.cpp context over a GGUF, with a reusable prompt prefix."""

    def __init__(self, model: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_batch: int = 512, seed: int = 0, n_gpu_layers: int | None = None, lora_path=None):
        import llama_cpp

        self.path = resolve_gguf(model, "--model")
        self.lora_path = resolve_gguf(lora_path, "--lora") if lora_path else None
        lora_kw = {"lora_path": str(self.lora_path)} if self.lora_path else {}
        self.n_threads = default_threads(n_threads)
        try:
            self.llm = load(self.path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                            n_threads=self.n_threads, n_threads_batch=self.n_threads, seed=seed, logits_all=False, **lora_kw)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"llama.cpp cannot load this GGUF ({' '.join(str(e).split())})", path=str(self.path),
                            field="--model") from None
        self._lc = llama_cpp
        self.n_gpu_layers = self.llm.medilora_load["n_gpu_layers"]
        self.amx_guard = self.llm.medilora_load["amx_guard"]
        # llama.cpp pads the context (800 -> 1024) but llama-cpp-python's buffers hold what was asked for
        self.n_ctx = min(self.llm.n_ctx(), n_ctx)
        self.n_batch = n_batch
        self.n_vocab = self.llm.n_vocab()
        tpl = self.llm.metadata.get("tokenizer.chat_template")
        self.template_source = "gguf" if tpl else "chatml-fallback"
        self._formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=tpl or CHATML, eos_token=self._piece(self.llm.token_eos()),
            bos_token=self._piece(self.llm.token_bos()), add_generation_prompt=True)
        self.add_bos = bool(self.llm._model.add_bos_token())
        self._prefix: list[int] = []
        self._prefix_ok = False
        self.evaluated_tokens = 0

    # -- text ---------------------------------------------------------------------------------
    def _piece(self, tok: int) -> str:
        if tok is None or tok < 0:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="ignore")

    def render(self, system: str, user: str) -> str:
        """The chat prompt (system + user, ready for the assistant's turn)."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = self._formatter(messages=msgs).prompt
        bos = self._piece(self.llm.token_bos())
        if self.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]  # llama.cpp adds it when tokenizing
        return text

    def render_messages(self, messages: list[dict]) -> str:
        """The chat prompt of a whole conversation (few-shot turns), ready for the assistant's turn."""
        text = self._formatter(messages=[m for m in messages if m.get("content") or m["role"] != "system"]).prompt
        bos = self._piece(self.llm.token_bos())
        if self.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text

    def prefix_for_messages(self, messages: list[dict]) -> list[int]:
        """Tokens every prompt of ``messages`` + one more user turn starts with (system and shots)."""
        text = self.render_messages([*messages, {"role": "user", "content": SENTINEL}])
        return self.tokenize(text[: text.index(SENTINEL)])

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="ignore")

    def prefix_for(self, system: str) -> list[int]:
        """Tokens every prompt with this system prompt starts with (up to the user's text)."""
        text = self.render(system, SENTINEL)
        head = text[: text.index(SENTINEL)]
        return self.tokenize(head)

    def set_prefix(self, tokens: list[int]) -> None:
        if list(tokens) != self._prefix:
            self._prefix = list(tokens)
            self._prefix_ok = False

    # -- evaluation ---------------------------------------------------------------------------
    def _eval(self, tokens: list[int]) -> None:
        if self.llm.n_tokens + len(tokens) > self.n_ctx:
            raise WorkError(f"context overflow: {self.llm.n_tokens + len(tokens)} tokens > n_ctx {self.n_ctx}")
        self.llm.eval(tokens)
        self.evaluated_tokens += len(tokens)

    def eval_prompt(self, tokens: list[int]) -> None:
        """Leave the context holding exactly ``tokens`` with their last logits current."""
        if not tokens:
            raise WorkError("empty prompt")
        if len(tokens) > self.n_ctx:
            raise WorkError(f"prompt of {len(tokens)} tokens does not fit n_ctx {self.n_ctx}")
        n = len(self._prefix)
        if n and len(tokens) > n and tokens[:n] == self._prefix:
            if not (self._prefix_ok and self.llm.n_tokens >= n):
                self.llm.reset()
                self._eval(self._prefix)
                self._prefix_ok = True
            self.llm.n_tokens = n  # Llama.eval drops the cache from n_tokens on
            self._eval(tokens[n:])
        else:
            self.llm.reset()
            self._prefix_ok = False
            self._eval(tokens)

    def last_logits(self, i: int = -1) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _rows_logits(self, tokens: list[int], n_past: int) -> list[np.ndarray]:
        """Decode ``tokens`` after position ``n_past`` (not kept) and return every position's logits."""
        rows = []
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            self.llm._batch.set_batch(chunk, n_past + i, logits_all=True)
            self.llm._ctx.decode(self.llm._batch)
            self.evaluated_tokens += len(chunk)
            rows.extend(self.last_logits(j) for j in range(len(chunk)))
        return rows

    def score(self, prompt_tokens: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | prompt), greedy?) for each continuation, one prompt evaluation."""
        self.eval_prompt(prompt_tokens)
        n = self.llm.n_tokens
        if n + max((len(c) for c in continuations), default=0) > self.n_ctx:
            raise WorkError(f"prompt + option longer than n_ctx {self.n_ctx}")
        first = log_softmax(self.last_logits())
        out = []
        dirty = False
        for cont in continuations:
            if not cont:
                raise WorkError("empty continuation")
            lp = float(first[cont[0]])
            greedy = int(first.argmax()) == cont[0]
            if len(cont) > 1:
                for j, row in enumerate(self._rows_logits(cont[:-1], n)):
                    ls = log_softmax(row)
                    lp += float(ls[cont[j + 1]])
                    greedy = greedy and int(ls.argmax()) == cont[j + 1]
                self.llm._ctx.kv_cache_seq_rm(-1, n, -1)  # back to the prompt's state
                dirty = True
            out.append((lp, greedy))
        if dirty:
            self.llm._requires_eval = True  # the logits buffer no longer holds the prompt's
        return out

    def split_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation as lm-eval does it: encode the whole, cut at the context."""
        ctx = self.tokenize(context)
        whole = self.tokenize(context + continuation)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.llm.tokenize(continuation.encode("utf-8"), add_bos=False, special=False)

    def is_eog(self, tok: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.llm._model.vocab, tok))

    def generate(self, prompt_tokens: list[int], *, max_tokens: int, sampling: dict, seed: int,
                 decided: Callable[[str], bool] | None = None, _evaluated: bool = False) -> tuple[str, int, str]:
        """(text, generated token count, finish reason: stop|length|decided)."""
        if not _evaluated:
            self.eval_prompt(prompt_tokens)
        self.llm.set_seed(seed)
        s = {**SAMPLING_DEFAULTS, **(sampling or {})}
        if len(prompt_tokens) + max_tokens > self.n_ctx:
            raise WorkError(f"prompt ({len(prompt_tokens)} tokens) + {max_tokens} new tokens exceed n_ctx {self.n_ctx}")
        gen = self.llm.generate(prompt_tokens, reset=True, top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"],
                                typical_p=s["typical_p"], temp=s["temperature"], repeat_penalty=s["repeat_penalty"],
                                frequency_penalty=s["frequency_penalty"], presence_penalty=s["presence_penalty"])
        out: list[int] = []
        reason = "length"
        try:
            for tok in gen:
                if self.is_eog(tok):
                    reason = "stop"
                    break
                out.append(tok)
                self.evaluated_tokens += 1
                if len(out) >= max_tokens:
                    break
                if decided is not None and decided(self.detokenize(out)):
                    reason = "decided"
                    break
        finally:
            gen.close()
        self._prefix_ok = self._prefix_ok and self.llm.n_tokens >= len(self._prefix)
        return self.detokenize(out), len(out), reason

    def generate_samples(self, prompt_tokens: list[int], seeds: list[int], *, max_tokens: int, sampling: dict,
                         decided: Callable[[str], bool] | None = None) -> list[tuple[str, int, str]]:
        """One draw per seed from the same prompt, the prompt evaluated once.

        The prompt up to its last token stays in the KV cache; before every draw the cache is rolled
        back to it (``kv_cache_seq_rm``, as ``score`` does) and only the last prompt token is decoded
        again, so that each draw starts from the same state and the sampler reads fresh logits. N
        draws cost one prompt evaluation + N tokens, not N prompt evaluations."""
        if len(prompt_tokens) < 2:
            raise WorkError("prompt too short for sampling")
        if len(prompt_tokens) + max_tokens > self.n_ctx:
            raise WorkError(f"prompt ({len(prompt_tokens)} tokens) + {max_tokens} new tokens exceed n_ctx {self.n_ctx}")
        head, last = prompt_tokens[:-1], prompt_tokens[-1]
        self.eval_prompt(head)
        out = []
        for seed in seeds:
            self.llm.n_tokens = len(head)   # Llama.eval drops the cache from n_tokens on
            self._eval([last])
            out.append(self.generate(prompt_tokens, max_tokens=max_tokens, sampling=sampling, seed=seed,
                                     decided=decided, _evaluated=True))
        return out

    # -- the floor ----------------------------------------------------------------------------
    def measure_speed(self, sample_tokens: list[int], n_pp: int = 512, n_tg: int = 64, reps: int = 2) -> dict:
        """llama.cpp's own speed on this file and thread count: prompt processing (a fresh
        ``n_pp``-token batch) and generation (``n_tg`` single-token decodes), each the best of ``reps``
        (the strictest floor when other processes share the CPU)."""
        toks = (sample_tokens * (n_pp // max(1, len(sample_tokens)) + 1))[:min(n_pp, self.n_ctx - n_tg - 1)]
        best = 0.0
        for _ in range(reps):
            self.llm.reset()
            t = time.perf_counter()
            self.llm.eval(toks)
            best = max(best, len(toks) / (time.perf_counter() - t))
        tg = 0.0
        for _ in range(reps):
            self.llm.reset()
            self.llm.eval(toks[:1])
            t = time.perf_counter()
            tok = toks[1]
            for _ in range(n_tg):
                self.llm.eval([tok])
                tok = int(self.last_logits().argmax())
            tg = max(tg, n_tg / (time.perf_counter() - t))
        self.llm.reset()
        self._prefix_ok = False
        return {"pp_tokens": len(toks), "pp_tok_s": best, "tg_tokens": n_tg, "tg_tok_s": tg, "threads": self.n_threads}

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
