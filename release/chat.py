"""`tools chat GGUF`: a terminal chat through the GGUF's own chat template, with the MediLoRA system
prompt and the evaluation protocol's sampling (tools.llm.SAMPLING_DEFAULTS: top-k 40, ...).

Tokens are printed as they are sampled. Commands: ``/reset`` (forget the conversation),
``/system TEXT`` (new system prompt, conversation reset; ``/system`` alone prints it), ``/exit``
(or Ctrl-D). ``--once TEXT`` answers one message and exits, for scripts. When the conversation no
longer fits the context, the oldest turns are dropped (the system prompt stays).
"""
from __future__ import annotations

import codecs
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tools.errors import UserError
from tools.ggufpath import resolve_gguf
from tools.llm import SAMPLING_DEFAULTS, LlamaRunner

from .export import default_system

HELP = "commands: /reset, /system [TEXT], /exit (or Ctrl-D)"


class ChatSession:
    def __init__(self, model, *, system: str, sampling: dict, max_tokens: int = 512, n_ctx: int = 4096,
                 seed: int = 0, threads: int | None = None, n_gpu_layers: int | None = None):
        if max_tokens < 1:
            raise UserError("must be at least 1", field="--max-tokens")
        self.lr = LlamaRunner(model, n_ctx=n_ctx, n_threads=threads, seed=seed, n_gpu_layers=n_gpu_layers)
        self.system = system
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.seed = seed
        self.history: list[dict] = []
        self.turns = 0

    def prompt_tokens(self) -> list[int]:
        """The whole conversation rendered by the GGUF's template, oldest turns dropped to fit."""
        lr = self.lr
        hist = list(self.history)
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + hist
            text = lr._formatter(messages=msgs).prompt
            bos = lr._piece(lr.llm.token_bos())
            if lr.add_bos and bos and text.startswith(bos):
                text = text[len(bos):]
            toks = lr.tokenize(text)
            if len(toks) + self.max_tokens <= lr.n_ctx:
                return toks
            if len(hist) <= 1:
                raise UserError(f"the message does not fit the context ({len(toks)} prompt tokens + "
                                f"{self.max_tokens} new > n_ctx {lr.n_ctx})", field="--n-ctx")
            hist = hist[2:] if len(hist) > 2 else hist[-1:]

    def reply(self, user: str, write=None) -> str:
        """Answer ``user`` (streamed to ``write``) and keep both turns in the history."""

        lr = self.lr
        self.history.append({"role": "user", "content": user})
        toks = self.prompt_tokens()
        s = {**SAMPLING_DEFAULTS, **self.sampling}
        lr.llm.reset()
        lr.llm.set_seed(self.seed + self.turns)
        gen = lr.llm.generate(toks, reset=True, top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"],
                              typical_p=s["typical_p"], temp=s["temperature"], repeat_penalty=s["repeat_penalty"],
                              frequency_penalty=s["frequency_penalty"], presence_penalty=s["presence_penalty"])
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        n = 0
        try:
            for tok in gen:
                if lr.is_eog(tok):
                    break
                piece = dec.decode(lr.llm.detokenize([tok], prev_tokens=None))
                if piece:
                    parts.append(piece)
                    if write:
                        write(piece)
                n += 1
                if n >= self.max_tokens:
                    break
        finally:
            gen.close()
        tail = dec.decode(b"", final=True)
        if tail:
            parts.append(tail)
            if write:
                write(tail)
        text = "".join(parts)
        self.history.append({"role": "assistant", "content": text})
        self.turns += 1
        return text

    def reset(self) -> int:
        n = len(self.history)
        self.history.clear()
        return n

    def close(self):
        self.lr.close()


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run_chat(session: ChatSession, once: str | None = None, *, read=input, echo=print) -> int:
    if once is not None:
        if not once.strip():
            raise UserError("--once needs a non-empty message", field="--once")
        session.reply(once, _write)
        echo("")
        return 0
    echo(f"chat with {session.lr.path.name} (n_ctx {session.lr.n_ctx}); {HELP}")
    while True:
        try:
            line = read("> ")
        except EOFError:
            echo("")
            return 0
        except KeyboardInterrupt:
            echo("")
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            echo(f"[conversation cleared: {session.reset()} messages]")
            continue
        if cmd == "/system" or cmd.startswith("/system "):
            text = cmd[len("/system"):].strip()
            if not text:
                echo(f"[system prompt: {session.system}]")
                continue
            session.system = text
            n = session.reset()
            echo(f"[system prompt set; conversation cleared: {n} messages]")
            continue
        if cmd.startswith("/"):
            echo(f"[unknown command {cmd.split()[0]}; {HELP}]")
            continue
        try:
            session.reply(line, _write)
        except UserError as e:
            session.history.pop()
            echo(f"\n[{e}]")
            continue
        echo("")


@dataclass(frozen=True)
class ChatSpec:
    """What `tools chat` was asked: the GGUF, the system prompt (or the task whose prompt to use), one message
    (``once``) or an interactive session, and the sampling and llama.cpp settings."""

    model: str | Path
    system: str | None = None
    system_task: str = "pubmedqa"
    once: str | None = None
    sampling: dict = field(default_factory=dict)
    max_tokens: int = 512
    n_ctx: int = 4096
    seed: int = 0
    threads: int | None = None
    n_gpu_layers: int | None = None


def chat_main(spec: ChatSpec) -> int:
    gguf = resolve_gguf(spec.model, "GGUF")
    system = spec.system if spec.system is not None else default_system(spec.system_task)
    s = ChatSession(gguf, system=system, sampling={k: v for k, v in spec.sampling.items() if v is not None},
                    max_tokens=spec.max_tokens, n_ctx=spec.n_ctx, seed=spec.seed, threads=spec.threads,
                    n_gpu_layers=spec.n_gpu_layers)
    try:
        return run_chat(s, spec.once)
    finally:
        s.close()
