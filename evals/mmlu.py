"""`tools eval mmlu-medical`: lm-eval's task machinery over the bundled MMLU CSVs (no Hub).

The nine subjects are local task files (``evals/lm_eval_tasks``, lm-eval's own MMLU prompt).
An HF model folder runs through lm-eval's ``hf`` model; a GGUF through ``medilora-gguf``, an
lm-eval model registered here and backed by our llama.cpp scorer (lm-eval's ``gguf`` backend
talks to a server and is broken / very slow against llama-cpp-python's).

results.json: task "mmlu-medical", shots, limit, n, accuracy (micro: over questions), accuracy_macro
(mean over subjects), valid_rate 1.0, subjects {name: {n, accuracy, stderr}}, model {path, name,
sha256, backend}, data {sha256 over the CSVs used}, lm_eval_version.
"""
from __future__ import annotations

import os
from pathlib import Path

from tools.artifact import Artifact, Stage, is_artifact
from tools.errors import UserError, WorkError
from tools.ggufpath import resolve_gguf
from tools.io import sha256_bytes, sha256_file, write_json
from tools.progress import log, progress

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "high_school_biology",
            "medical_genetics", "nutrition", "professional_medicine", "virology")
GGUF_MODEL_NAME = "medilora-gguf"


def task_manager(metadata: dict | None = None):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def _register():
    """Register the llama.cpp-backed lm-eval model (idempotent)."""
    from lm_eval.api.model import LM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    if GGUF_MODEL_NAME in MODEL_REGISTRY:
        return MODEL_REGISTRY[GGUF_MODEL_NAME]

    @register_model(GGUF_MODEL_NAME)
    class LlamaCppLM(LM):
        """lm-eval model over a GGUF via tools.llm.LlamaRunner: one prompt evaluation per context,
        every continuation scored from it; per task the contexts' common token prefix is kept."""

        def __init__(self, pretrained: str, n_ctx: int = 4096, threads: int | None = None, seed: int = 0,
                     n_gpu_layers: int | None = None, **_):
            super().__init__()
            from tools.llm import LlamaRunner
            self.runner = LlamaRunner(pretrained, n_ctx=int(n_ctx), n_threads=int(threads) if threads else None,
                                      seed=int(seed), n_gpu_layers=n_gpu_layers)

        @property
        def tokenizer_name(self) -> str:
            return str(self.runner.path.name)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            r = self.runner
            pairs = [req.args for req in requests]
            # group by context (one evaluation each), remember each request's slot
            groups: dict[str, list[int]] = {}
            for i, (ctx, _cont) in enumerate(pairs):
                groups.setdefault(ctx, []).append(i)
            by_task: dict[str, list[str]] = {}
            for i, req in enumerate(requests):
                ctx = pairs[i][0]
                lst = by_task.setdefault(req.task_name or "", [])
                if not lst or lst[-1] != ctx:
                    lst.append(ctx)
            out: list = [None] * len(requests)
            with progress("lm-eval loglikelihood", total=len(groups), unit="contexts") as advance:
                for task, ctxs in by_task.items():
                    toks = {c: r.tokenize(c) for c in dict.fromkeys(ctxs)}
                    lists = list(toks.values())
                    pre = lists[0]
                    for t in lists[1:]:
                        n = 0
                        while n < min(len(pre), len(t)) and pre[n] == t[n]:
                            n += 1
                        pre = pre[:n]
                    r.set_prefix(pre[: max(0, min(len(t) for t in lists) - 1)])
                    for ctx in dict.fromkeys(ctxs):
                        idx = [i for i in groups.pop(ctx, []) if out[i] is None]
                        if not idx:
                            continue
                        conts, ctx_toks = [], None
                        for i in idx:
                            ctx_toks, cont = r.split_continuation(ctx, pairs[i][1])
                            conts.append(cont)
                        for i, res in zip(idx, r.score(ctx_toks, conts)):
                            out[i] = res
                        advance(1)
            if any(o is None for o in out):
                raise WorkError("internal: a request was not scored")
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            import numpy as np

            from tools.llm import log_softmax
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
                total = float(np.sum([log_softmax(row)[t] for row, t in zip(rows, seq[1:])]))
                r.llm._ctx.kv_cache_seq_rm(-1, 0, -1)
                res.append(total)
            return res

        def generate_until(self, requests, disable_tqdm: bool = False):
            r = self.runner
            res = []
            for req in requests:
                ctx, kw = req.args
                until = kw.get("until") or []
                if isinstance(until, str):
                    until = [until]
                max_toks = int(kw.get("max_gen_toks", 256))
                temp = float(kw.get("temperature", 0.0))

                def stop(text, _u=until):
                    return any(u in text for u in _u)
                text, _n, _why = r.generate(r.tokenize(ctx), max_tokens=max_toks, sampling={"temperature": temp},
                                            seed=0, decided=stop if until else None)
                for u in until:
                    text = text.split(u)[0]
                res.append(text)
            return res

        def close(self):
            self.runner.close()

    return LlamaCppLM


def _model_info(model: Path) -> tuple[str, dict]:
    if model.is_dir():
        if not (model / "config.json").is_file():
            raise UserError("not an HF model folder (no config.json) and not a .gguf file", path=str(model),
                            field="--model")
        h = sha256_bytes("".join(f"{p.name}:{sha256_file(p)}" for p in sorted(model.glob("*.safetensors"))))
        return "hf", {"path": str(model.resolve()), "name": model.name, "sha256": h, "backend": "lm-eval hf"}
    resolve_gguf(model, "--model")
    return "gguf", {"path": str(model.resolve()), "name": model.name, "sha256": sha256_file(model),
                    "backend": f"lm-eval {GGUF_MODEL_NAME} (llama.cpp)"}


def run_mmlu(model: str | os.PathLike | None = None, *, shots: int = 0, subjects: list[str] | None = None,
             limit: int | None = None, threads: int | None = None, batch_size: int = 1,
             n_gpu_layers: int | None = None, out: str | os.PathLike | None = None, force: bool = False,
             seed: int = 0, plots: bool = True) -> Artifact:
    from tools.paths import bundled_data, embedded_gguf

    if shots not in (0, 5):
        raise UserError("must be 0 or 5", field="--shots")
    if limit is not None and limit < 1:
        raise UserError("must be at least 1", field="--limit")
    subjects = list(subjects or SUBJECTS)
    for s in subjects:
        if s not in SUBJECTS:
            raise UserError(f"unknown subject {s!r} (one of {', '.join(SUBJECTS)})", field="--subjects")
    model_path = Path(model) if model else embedded_gguf()
    if not model_path.exists():
        raise UserError("model not found", path=str(model_path), field="--model")
    if model_path.is_dir() and not (model_path / "config.json").is_file() and any(model_path.glob("*.gguf")):
        model_path = resolve_gguf(model_path, "--model")  # a GGUF artifact folder (tools convert / quantize)
    kind, minfo = _model_info(model_path)
    root = bundled_data() / "mmlu_medical"
    csvs = [root / sp / f"{s}_{sp}.csv" for s in subjects for sp in ("test", "dev")]
    out = Path(out) if out else Path("runs") / "eval" / f"mmlu-medical-{model_path.stem}-{shots}shot"
    params = {"shots": shots, "subjects": subjects, "limit": limit, "seed": seed, "backend": kind}
    inputs = ([model_path] if kind == "gguf" or is_artifact(model_path) else []) + csvs
    if kind == "hf" and not is_artifact(model_path):
        params["model_sha256"] = minfo["sha256"]
    with Stage("eval.mmlu-medical", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        import time

        import lm_eval
        from lm_eval import simple_evaluate
        tasks = [f"mmlu_medical_{s}" for s in subjects]
        t0 = time.perf_counter()
        if kind == "gguf":
            cls = _register()
            lm = cls(pretrained=str(model_path), threads=threads, seed=seed, n_gpu_layers=n_gpu_layers)
            ngl_used = lm.runner.n_gpu_layers
        else:
            from lm_eval.models.huggingface import HFLM
            lm = HFLM(pretrained=str(model_path), device="cpu", dtype="float32", batch_size=batch_size)
            ngl_used = None
        try:
            res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, task_manager=task_manager(),
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
        finally:
            if kind == "gguf":
                lm.close()
        wall = time.perf_counter() - t0
        subj = {}
        for s, t in zip(subjects, tasks):
            r = res["results"][t]
            n = int(res["n-samples"][t]["effective"])
            se = r.get("acc_stderr,none")
            subj[s] = {"n": n, "accuracy": round(float(r["acc,none"]), 6),
                       "stderr": round(float(se), 6) if isinstance(se, (int, float)) else None}
        n = sum(v["n"] for v in subj.values())
        micro = sum(v["accuracy"] * v["n"] for v in subj.values()) / n
        macro = sum(v["accuracy"] for v in subj.values()) / len(subj)
        results = {"schema": 1, "task": "mmlu-medical", "shots": shots, "limit": limit, "n": n,
                   "accuracy": round(micro, 6), "accuracy_macro": round(macro, 6), "valid_rate": 1.0,
                   "subjects": subj, "model": minfo, "seed": seed, "n_gpu_layers": ngl_used,
                   "data": {"sha256": sha256_bytes("".join(f"{p.name}:{sha256_file(p)}" for p in csvs))},
                   "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _lm_eval_version()}
        write_json(st.path("results.json"), results)
        from .render import render_mmlu_report
        render_mmlu_report(results, st.path("report.md").parent, plots=plots)
        st.lineage.licenses.add("MIT")
        st.lineage.sources.add("MMLU (medical subjects)")
        st.extra.update({"accuracy": results["accuracy"], "n": n,
                         "timing": {"wall_s": round(wall, 3), "s_per_item": round(wall / n, 4)}})
    return st.result


def _lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


def summary_lines(res: dict) -> list[str]:
    """Accuracy per subject, then the macro average."""
    lines = [f"{s:24s} {v['n']:5d}  {100 * v['accuracy']:5.1f}%" for s, v in res["subjects"].items()]
    return lines + [f"{'average (macro)':24s} {res['n']:5d}  {100 * res['accuracy_macro']:5.1f}%"]
