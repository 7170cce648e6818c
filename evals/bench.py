"""`tools bench pubmedqa|medqa`: the shipped GGUF under the MediLoRA protocol.

Artifact (stage ``bench.<task>``): ``results.json`` (schema below), ``items.jsonl`` (one line an
item), ``report.md`` and PNG plots. Same model + data + parameters + seed -> byte-identical files;
wall-clock figures live only in ``manifest.json`` (``extra.timing``), as the artifact contract wants.

results.json (schema 1)::

    task, mode (generate|loglik), split, n, seed,
    model {path, name, sha256}, data {path, sha256},
    accuracy                 # generate: on the lenient parse; loglik: argmax of summed log-likelihood
    accuracy_strict          # generate only: strict answers only
    accuracy_norm            # loglik only: argmax of log-likelihood per byte of the option
    valid_rate               # share of items with a parsed answer (lenient); 1.0 in loglik mode
    valid_rates {strict, lenient}
    macro_f1, per_label {label: {precision, recall, f1, support}},
    confusion {labels, columns (labels + "invalid"), matrix (rows gold, columns predicted)},
    sampling {temperature, top_k, top_p, min_p, typical_p, repeat_penalty, ...}, max_tokens,
    full_answer, n_ctx, threads, prompt {template, system_sha256, format},
    tokens {prompt_total, prompt_mean, generated_total, evaluated_total}, rag {index, k} | null

items.jsonl: id, gold, prompt_sha256, prompt_tokens, and for generate: raw, parsed, strict,
finish, gen_tokens; for loglik: loglik {label: nats}, pred, pred_norm, correct_norm; both: correct,
(rag: chunks [{id, score}]).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from tools.artifact import Artifact, Stage, is_artifact
from tools.errors import UserError
from tools.io import sha256_bytes, sha256_file, write_json, write_jsonl
from tools.progress import log, progress

from . import extract
from .items import Item, answer_text, load_items, question_block, system_prompt, user_message

PROMPT_FORMAT = "medilora-bench-1"


def _labels(task: str, items: list[Item]) -> list[str]:
    if task == "pubmedqa":
        return ["yes", "no", "maybe"]
    seen: list[str] = []
    for it in items:
        for k in it.options:
            if k not in seen:
                seen.append(k)
    return sorted(seen)


def classification_metrics(labels: list[str], gold: list[str], pred: list[str | None]) -> dict:
    """Accuracy, confusion (with an "invalid" column) and macro-F1 over ``labels``."""
    cols = labels + ["invalid"]
    matrix = [[0] * len(cols) for _ in labels]
    for g, p in zip(gold, pred):
        matrix[labels.index(g)][cols.index(p) if p in labels else len(labels)] += 1
    per = {}
    for i, lab in enumerate(labels):
        tp = matrix[i][i]
        fn = sum(matrix[i]) - tp
        fp = sum(matrix[r][i] for r in range(len(labels))) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        per[lab] = {"precision": round(prec, 6), "recall": round(rec, 6), "f1": round(f1, 6), "support": tp + fn}
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0
    present = [lab for lab in labels if per[lab]["support"] or any(p == lab for p in pred)]
    macro = sum(per[lab]["f1"] for lab in present) / len(present) if present else 0.0
    return {"accuracy": round(acc, 6), "macro_f1": round(macro, 6), "per_label": per,
            "confusion": {"labels": labels, "columns": cols, "matrix": matrix}}


def default_out(task: str, mode: str, model: Path, split: str) -> Path:
    return Path("runs") / "bench" / f"{task}-{mode}-{model.stem}-{split}"


def run_bench(task: str, *, model: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
              split: str = "test", limit: int | None = None, seed: int = 0, threads: int | None = None,
              mode: str = "generate", full_answer: bool = False, max_tokens: int = 16,
              sampling: dict | None = None, out: str | os.PathLike | None = None, force: bool = False,
              rag: str | os.PathLike | None = None, k: int = 6, n_ctx: int = 4096, n_batch: int = 512,
              plots: bool = True) -> Artifact:
    from tools.paths import embedded_gguf

    from .llm import SAMPLING_DEFAULTS, LlamaRunner, check_gguf, item_seed

    if mode not in ("generate", "loglik"):
        raise UserError(f"unknown mode {mode!r} (generate or loglik)", field="--mode")
    if limit is not None and limit < 1:
        raise UserError("must be at least 1", field="--limit")
    if max_tokens < 1:
        raise UserError("must be at least 1", field="--max-tokens")
    if k < 1:
        raise UserError("must be at least 1", field="--k")
    model_path = check_gguf(model) if model else embedded_gguf()
    items, data_path = load_items(task, data, split, limit)
    samp = {**SAMPLING_DEFAULTS, **{k_: v for k_, v in (sampling or {}).items() if v is not None}}
    unknown = set(samp) - set(SAMPLING_DEFAULTS)
    if unknown:
        raise UserError(f"unknown sampling parameter {sorted(unknown)[0]!r}", field="sampling")
    rag_dir = Path(rag) if rag else None
    if rag_dir is not None and not rag_dir.is_dir():
        raise UserError("RAG index folder not found", path=str(rag_dir), field="--rag")
    out = Path(out) if out else default_out(task, mode, model_path, split)
    params = {"task": task, "mode": mode, "split": split if not data else "custom", "limit": limit, "seed": seed,
              "max_tokens": max_tokens if mode == "generate" else None,
              "full_answer": full_answer if mode == "generate" else None,
              "sampling": samp if mode == "generate" else None, "n_ctx": n_ctx, "prompt_format": PROMPT_FORMAT,
              "rag": {"index": str(rag_dir), "k": k} if rag_dir else None}
    inputs = [model_path, data_path] + ([rag_dir] if rag_dir and is_artifact(rag_dir) else [])
    with Stage(f"bench.{task}", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        retriever = fit_context = None
        if rag_dir is not None:
            from evals.rag import Retriever, fit_context  # noqa: F811 - written by the RAG package
            retriever = Retriever(rag_dir)
        labels = _labels(task, items)
        t0 = time.perf_counter()
        rows: list[dict] = []
        with LlamaRunner(model_path, n_ctx=n_ctx, n_threads=threads, n_batch=n_batch, seed=seed) as lr:
            t_load = time.perf_counter() - t0
            prefixes: dict[str, list[int]] = {}
            n_prompt_tokens = n_gen = 0
            lr.evaluated_tokens = 0
            t1 = time.perf_counter()
            with progress(f"{task} {mode}", total=len(items), unit="items") as advance:
                for it in items:
                    system = system_prompt(task, it.options)
                    row: dict = {"id": it.id, "gold": it.answer}
                    rag_text = ""
                    if retriever is not None:
                        qb = question_block(task, it)
                        chunks = retriever.search(it.question, k)
                        room = max_tokens if mode == "generate" else max(
                            lr.count_tokens(answer_text(task, lab, it)) for lab in it.options)
                        rag_text, kept = fit_context(system, qb, chunks, lr.count_tokens, lr.n_ctx, room + 24)
                        row["chunks"] = [{"id": c.get("id"), "score": round(float(c.get("score", 0.0)), 6)} for c in kept]
                    prompt = lr.render(system, user_message(task, it, rag_text))
                    if system not in prefixes:
                        prefixes[system] = lr.prefix_for(system)
                    lr.set_prefix(prefixes[system])
                    row["prompt_sha256"] = sha256_bytes(prompt)
                    if mode == "loglik":
                        opts = list(it.options)
                        conts = []
                        ptoks = None
                        for lab in opts:
                            ctx_toks, cont = lr.split_continuation(prompt, answer_text(task, lab, it))
                            ptoks = ctx_toks
                            conts.append(cont)
                        scores = lr.score(ptoks, conts)
                        ll = {lab: round(s[0], 6) for lab, s in zip(opts, scores)}
                        norm = {lab: s[0] / max(1, len(answer_text(task, lab, it).encode("utf-8")))
                                for lab, s in zip(opts, scores)}
                        pred = max(opts, key=lambda lab: (ll[lab], -opts.index(lab)))
                        pred_norm = max(opts, key=lambda lab: (norm[lab], -opts.index(lab)))
                        row.update({"prompt_tokens": len(ptoks), "loglik": ll, "pred": pred, "pred_norm": pred_norm,
                                    "correct": pred == it.answer, "correct_norm": pred_norm == it.answer})
                        n_prompt_tokens += len(ptoks)
                    else:
                        ptoks = lr.tokenize(prompt)
                        opts = list(it.options)

                        def decided(text, _opts=opts):
                            return extract.parse(task, text, _opts, final=False).decided
                        text, ng, reason = lr.generate(ptoks, max_tokens=max_tokens, sampling=samp,
                                                       seed=item_seed(seed, it.id),
                                                       decided=None if full_answer else decided)
                        p = extract.parse(task, text, opts, final=True)
                        row.update({"prompt_tokens": len(ptoks), "raw": text, "parsed": p.label, "strict": p.strict,
                                    "finish": reason, "gen_tokens": ng, "correct": p.label == it.answer})
                        n_prompt_tokens += len(ptoks)
                        n_gen += ng
                    rows.append(row)
                    advance(1)
            wall = time.perf_counter() - t1
            evaluated = lr.evaluated_tokens
            threads_used = lr.n_threads
            template = lr.template_source
        gold = [r["gold"] for r in rows]
        n = len(rows)
        if mode == "loglik":
            m = classification_metrics(labels, gold, [r["pred"] for r in rows])
            extra_m = {"accuracy_norm": round(sum(r["correct_norm"] for r in rows) / n, 6),
                       "valid_rate": 1.0, "valid_rates": {"strict": 1.0, "lenient": 1.0}}
        else:
            m = classification_metrics(labels, gold, [r["parsed"] for r in rows])
            strict_pred = [r["parsed"] if r["strict"] else None for r in rows]
            extra_m = {"accuracy_strict": round(sum(g == p for g, p in zip(gold, strict_pred)) / n, 6),
                       "valid_rate": round(sum(r["parsed"] is not None for r in rows) / n, 6),
                       "valid_rates": {"strict": round(sum(p is not None for p in strict_pred) / n, 6),
                                       "lenient": round(sum(r["parsed"] is not None for r in rows) / n, 6)}}
        systems = sorted({system_prompt(task, it.options) for it in items})
        results = {
            "schema": 1, "task": task, "mode": mode, "split": params["split"], "n": n, "seed": seed,
            "model": {"path": str(model_path.resolve()), "name": model_path.name, "sha256": sha256_file(model_path)},
            "data": {"path": str(data_path.resolve()), "sha256": sha256_file(data_path)},
            **m, **extra_m,
            "sampling": samp if mode == "generate" else None,
            "max_tokens": max_tokens if mode == "generate" else None,
            "full_answer": full_answer if mode == "generate" else None,
            "n_ctx": n_ctx,
            "prompt": {"template": template, "format": PROMPT_FORMAT,
                       "system_sha256": [sha256_bytes(s) for s in systems]},
            "tokens": {"prompt_total": n_prompt_tokens, "prompt_mean": round(n_prompt_tokens / n, 3),
                       "generated_total": n_gen},
            "rag": params["rag"],
        }
        write_json(st.path("results.json"), results)
        write_jsonl(st.path("items.jsonl"), rows)
        from .report import render_bench_report
        render_bench_report(results, rows, st.path("report.md").parent, plots=plots)
        st.lineage.licenses.add("MIT")
        st.lineage.sources.add(f"{task} ({data_path.name})")
        st.extra.update({"accuracy": results["accuracy"], "valid_rate": results["valid_rate"], "n": n,
                         "timing": {"wall_s": round(wall, 3), "load_s": round(t_load, 3),
                                    "items_per_s": round(n / wall, 4) if wall else None,
                                    "s_per_item": round(wall / n, 4), "evaluated_tokens": evaluated,
                                    "threads": threads_used}})
    return st.result
