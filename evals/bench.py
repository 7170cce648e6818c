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

    accuracy_ci95, valid_rate_ci95, macro_f1_ci95   # [low, high], 95 %: Wilson for the proportions,
                                                    # a seeded bootstrap over items for macro-F1
    (mcq: flavor, map; --shots/--cot/--samples: shots {k, ids, source, ...}, cot, samples,
     self_consistency {samples, ties, tie_rule, unanimous, valid_sample_rate})

items.jsonl: id, gold, prompt_sha256, prompt_tokens, and for generate: raw, parsed, strict,
finish, gen_tokens; for loglik: loglik {label: nats}, pred, pred_norm, correct_norm; both: correct,
(rag: chunks [{id, score}]; --shots: shots used; --samples N: samples [{raw, parsed, finish,
gen_tokens}], votes, tie).

Few-shot (``--shots K``): K dev examples (never test items; seeded, fixed for the run, stratified
by label for yes/no/maybe) as prior ChatML turns; they are part of the cached prompt prefix. An item
whose prompt would not fit n_ctx drops shots, never its question. ``--cot`` asks for reasoning and
a final "Answer: X" line (the only form that counts); ``--samples N`` draws N answers from one
prompt evaluation (tools.llm.LlamaRunner.generate_samples) and takes the majority.

Resume: every finished item is appended (and flushed) to ``.OUT.items-<fingerprint>.jsonl`` beside
OUT; the same run started again continues after the last finished item and writes the same files
as an uninterrupted run (generation is seeded per item and always starts from the same prefix).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tools.artifact import Artifact, Stage, is_artifact
from tools.errors import UserError
from tools.io import sha256_bytes, sha256_file, write_json, write_jsonl
from tools.progress import log, progress

from . import extract
from .items import Item, answer_text, question_block, system_prompt, user_message

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


# ---- self-consistency ----------------------------------------------------------------------

def majority(labels: list[str | None]) -> tuple[str | None, dict[str, int], bool]:
    """(winner, votes, tie): the most voted label among the parsed ones (None never votes); a tie
    between the top labels goes to the one voted first (the earliest sample), and is reported."""
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab is None:
            continue
        votes[lab] = votes.get(lab, 0) + 1
        first.setdefault(lab, i)
    if not votes:
        return None, {}, False
    top = max(votes.values())
    leaders = [lab for lab in votes if votes[lab] == top]
    return min(leaders, key=first.__getitem__), votes, len(leaders) > 1


# ---- few-shot --------------------------------------------------------------------------------

def _norm_q(text: str) -> str:
    return " ".join(text.lower().split())


def pick_shots(pool: list[Item], k: int, seed: int, flavor: str, test_items: list[Item],
               task: str) -> tuple[list[Item], int]:
    """K dev examples (seeded, fixed for the run; stratified by label for yes/no/maybe), none of
    which is a test item (same question text, or the same PubMed id). Returns (shots, excluded)."""
    import random

    test_q = {_norm_q(t.question) for t in test_items}
    test_ids = {t.id for t in test_items} if task == "pubmedqa" else set()
    clean = [p for p in pool if _norm_q(p.question) not in test_q and p.id not in test_ids]
    excluded = len(pool) - len(clean)
    if k > len(clean):
        raise UserError(f"{k} shots asked, the dev pool holds {len(clean)} usable examples "
                        f"({excluded} excluded as test items)", field="--shots")
    rng = random.Random(f"medilora-shots:{seed}")
    if flavor == "pubmedqa":
        by: dict[str, list[Item]] = {}
        for p in clean:
            by.setdefault(p.answer, []).append(p)
        for lab in by:
            rng.shuffle(by[lab])
        order = [lab for lab in ("yes", "no", "maybe") if by.get(lab)]
        shots: list[Item] = []
        i = 0
        while len(shots) < k:
            lab = order[i % len(order)]
            if by[lab]:
                shots.append(by[lab].pop(0))
            i += 1
        rng.shuffle(shots)
        return shots, excluded
    return rng.sample(clean, k), excluded


def _long_answers(path: Path) -> dict[str, str]:
    """PubMedQA dev rows carry a LONG_ANSWER: the reasoning of a CoT shot."""
    import json
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(d, dict) and isinstance(d.get("LONG_ANSWER"), str):
                    out[str(d.get("id"))] = d["LONG_ANSWER"].strip()
    return out


def shot_turns(flavor: str, shots: list[Item], cot: bool, long_answers: dict[str, str]) -> list[dict]:
    turns = []
    for sh in shots:
        user = user_message(flavor, sh)
        if cot:
            user += "\n\n" + extract.cot_instruction(flavor, list(sh.options))
            reason = long_answers.get(sh.id, "")
            ans = f"Answer: {sh.answer}"
            assistant = f"{reason}\n{ans}" if reason else ans
        else:
            assistant = answer_text(flavor, sh.answer, sh)
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return turns


# ---- resume ----------------------------------------------------------------------------------

def scratch_path(out: Path, fingerprint: str) -> Path:
    """Where the finished items of an unfinished run live: next to OUT, keyed by the run's fingerprint."""
    return out.parent / f".{out.name}.items-{fingerprint[:16]}.jsonl"


def _read_scratch(path: Path, items: list[Item]) -> list[dict]:
    import json
    rows: list[dict] = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the line being written when the run was killed
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if len(rows) >= len(items) or not isinstance(row, dict) or row.get("id") != items[len(rows)].id:
                log(f"note: {path} does not match this run's items; starting from the first item")
                return []
            rows.append(row)
    return rows


# ---- the run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSpec:
    """Everything one bench run depends on: the single source of `tools bench`'s options (the Click
    options of the bench verbs are checked against these fields) and of run_bench's arguments.
    ``sweep --eval`` derives a trial's bench with ``dataclasses.replace(spec, model=..., out=...)``."""

    task: str
    model: str | os.PathLike | None = None
    data: str | os.PathLike | None = None
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    threads: int | None = None
    mode: str = "generate"
    full_answer: bool = False
    max_tokens: int | None = None
    sampling: dict | None = None
    out: str | os.PathLike | None = None
    force: bool = False
    rag: str | os.PathLike | None = None
    k: int = 6
    n_ctx: int = 4096
    n_batch: int = 512
    plots: bool = True
    n_gpu_layers: int | None = None
    shots: int = 0
    cot: bool = False
    samples: int = 1
    dev: str | os.PathLike | None = None
    field_map: dict[str, list[str]] | None = None
    lora: str | os.PathLike | None = None

    # options of the bench verbs that are not fields: the sampling knobs (gathered into ``sampling``)
    SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")

    @classmethod
    def from_options(cls, task: str, params: dict) -> "BenchSpec":
        """The spec of a bench verb's parsed options (``--map`` pairs become ``field_map``)."""
        from .mcq import parse_map

        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in params.items() if k in names and k != "task"}
        kw["sampling"] = {k: params.get(k) for k in cls.SAMPLING_OPTIONS}
        if params.get("maps"):
            kw["field_map"] = parse_map(params["maps"])
        if params.get("answer_base") is not None:  # mcq: how to read integer answers (evals.mcq.load_mcq)
            kw["field_map"] = {**(kw.get("field_map") or {}), "answer_base": [str(params["answer_base"])]}
        return cls(task=task, **kw)


def run_bench(task: str | BenchSpec, **kw) -> Artifact:
    """Run one bench: ``run_bench(spec)`` or ``run_bench(task, **BenchSpec fields)``."""
    spec = task if isinstance(task, BenchSpec) else BenchSpec(task=task, **kw)
    return _run(**asdict(spec))


def _run(task: str, *, model, data, split, limit, seed, threads, mode, full_answer, max_tokens, sampling, out,
         force, rag, k, n_ctx, n_batch, plots, n_gpu_layers, shots, cot, samples, dev, field_map, lora) -> Artifact:
    import json

    from tools.llm import SAMPLING_DEFAULTS, LlamaRunner, check_gguf, item_seed
    from tools.paths import embedded_gguf

    from .items import load_items
    from .stats import bootstrap_macro_f1, wilson

    if mode not in ("generate", "loglik"):
        raise UserError(f"unknown mode {mode!r} (generate or loglik)", field="--mode")
    if limit is not None and limit < 1:
        raise UserError("must be at least 1", field="--limit")
    if max_tokens is None:
        max_tokens = 256 if cot else 16
    if max_tokens < 1:
        raise UserError("must be at least 1", field="--max-tokens")
    if k < 1:
        raise UserError("must be at least 1", field="--k")
    if shots < 0:
        raise UserError("must be 0 or more", field="--shots")
    if samples < 1:
        raise UserError("must be at least 1", field="--samples")
    if mode == "loglik" and (cot or samples > 1):
        raise UserError("--cot and --samples draw answers: use them with --mode generate",
                        field="--cot" if cot else "--samples")
    model_path = check_gguf(model) if model else embedded_gguf()
    lora_path = check_gguf(lora) if lora else None
    if task == "mcq":
        from .mcq import load_mcq
        if not data:
            raise UserError("tools bench mcq needs --data FILE.jsonl", field="--data")
        items, data_path, flavor = load_mcq(data, field_map, limit)
        all_items = load_mcq(data, field_map)[0] if shots else items
    else:
        if field_map:
            raise UserError("--map is for tools bench mcq", field="--map")
        flavor = task
        items, data_path = load_items(task, data, split, limit)
        all_items = load_items(task, data, split)[0] if shots else items
    shot_items: list[Item] = []
    dev_path: Path | None = None
    excluded = 0
    long_answers: dict[str, str] = {}
    if shots:
        if dev is None and task == "mcq":
            raise UserError("--shots with tools bench mcq needs --dev FILE.jsonl (the examples' split)", field="--dev")
        if dev is None and not data and split == "dev":
            raise UserError("--shots takes its examples from the dev split: bench the test split (or give --dev)",
                            field="--shots")
        if task == "mcq":
            from .mcq import load_mcq
            pool, dev_path, dflav = load_mcq(dev, field_map)
            if dflav != flavor:
                raise UserError(f"the --dev file is a {dflav} set, the bench data a {flavor} set", path=str(dev_path),
                                field="--dev")
        else:
            pool, dev_path = load_items(task, dev, "dev")
        if dev_path.resolve() == data_path.resolve():
            raise UserError("--shots examples must come from another file than the items benched", path=str(dev_path),
                            field="--dev")
        shot_items, excluded = pick_shots(pool, shots, seed, flavor, all_items, task)
        if cot and flavor == "pubmedqa":
            long_answers = _long_answers(dev_path)
        if excluded:
            log(f"few-shot: {excluded} dev examples left out of the pool because they are test items")
    samp = {**SAMPLING_DEFAULTS, **{k_: v for k_, v in (sampling or {}).items() if v is not None}}
    unknown = set(samp) - set(SAMPLING_DEFAULTS)
    if unknown:
        raise UserError(f"unknown sampling parameter {sorted(unknown)[0]!r}", field="sampling")
    rag_dir = Path(rag) if rag else None
    if rag_dir is not None and not rag_dir.is_dir():
        raise UserError("RAG index folder not found", path=str(rag_dir), field="--rag")
    if out:
        out = Path(out)
    elif task == "mcq":
        out = Path("runs") / "bench" / f"mcq-{data_path.stem}-{mode}-{model_path.stem}"
    else:
        out = default_out(task, mode, model_path, split)
    params = {"task": task, "mode": mode, "split": split if not data else "custom", "limit": limit, "seed": seed,
              "max_tokens": max_tokens if mode == "generate" else None,
              "full_answer": full_answer if mode == "generate" else None,
              "sampling": samp if mode == "generate" else None, "n_ctx": n_ctx, "prompt_format": PROMPT_FORMAT,
              "rag": {"index": str(rag_dir), "k": k} if rag_dir else None}
    if shots or cot or samples > 1 or task == "mcq":  # new parameters; old runs keep their fingerprints
        params.update({"shots": shots, "cot": cot, "samples": samples, "map": field_map or None})
    if lora_path:  # a LoRA adapter GGUF applied by llama.cpp (tools convert --lora)
        params["lora"] = lora_path.name
    inputs = [model_path, data_path] + ([dev_path] if dev_path else []) + ([lora_path] if lora_path else []) + \
        ([rag_dir] if rag_dir and is_artifact(rag_dir) else [])
    resumed = 0
    with Stage(f"bench.{task}", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        scratch = scratch_path(out, st.fingerprint)
        rows: list[dict] = _read_scratch(scratch, items)
        resumed = len(rows)
        with open(scratch, "w", encoding="utf-8") as f:  # rewritten without a torn last line
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        if resumed:
            if resumed < len(items):
                log(f"resuming: {resumed} of {len(items)} items already done ({scratch}); continuing from item "
                    f"{resumed + 1} (id {items[resumed].id})")
            else:
                log(f"resuming: all {len(items)} items already done ({scratch}); writing the results")
        retriever = fit_context = None
        if rag_dir is not None:
            from evals.rag import Retriever, fit_context  # noqa: F811 - written by the RAG package
            retriever = Retriever(rag_dir)
        labels = _labels(flavor, items)
        t0 = time.perf_counter()
        turns_all = shot_turns(flavor, shot_items, cot, long_answers)
        with LlamaRunner(model_path, n_ctx=n_ctx, n_threads=threads, n_batch=n_batch, seed=seed,
                         n_gpu_layers=n_gpu_layers, lora_path=lora_path) as lr:
            t_load = time.perf_counter() - t0
            prefixes: dict[tuple, list[int]] = {}
            lr.evaluated_tokens = 0
            t1 = time.perf_counter()
            sf = open(scratch, "a", encoding="utf-8")
            try:
                with progress(f"{task} {mode}", total=len(items), unit="items") as advance:
                    if resumed:
                        advance(resumed)
                    for it in items[resumed:]:
                        row = _run_item(lr, it, flavor, mode, seed, samples, cot, full_answer, max_tokens, samp,
                                        turns_all, shots, retriever, fit_context, k, prefixes, item_seed)
                        sf.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                        sf.flush()
                        rows.append(row)
                        advance(1)
            except KeyboardInterrupt:
                sf.close()
                log(f"interrupted after {len(rows)} of {len(items)} items ({len(rows) - resumed} in this run); "
                    f"they are saved in {scratch}. Run the same command again to continue from item {len(rows) + 1}.")
                raise
            finally:
                sf.close()
            wall = time.perf_counter() - t1
            evaluated = lr.evaluated_tokens
            threads_used = lr.n_threads
            ngl_used = lr.n_gpu_layers
            template = lr.template_source
        rows = [json.loads(json.dumps(r, ensure_ascii=False, sort_keys=True)) for r in rows]  # as read back on resume
        gold = [r["gold"] for r in rows]
        n = len(rows)
        if mode == "loglik":
            preds = [r["pred"] for r in rows]
            m = classification_metrics(labels, gold, preds)
            n_norm = sum(r["correct_norm"] for r in rows)
            extra_m = {"accuracy_norm": round(n_norm / n, 6), "accuracy_norm_ci95": wilson(n_norm, n),
                       "valid_rate": 1.0, "valid_rates": {"strict": 1.0, "lenient": 1.0}, "valid_rate_ci95": wilson(n, n)}
        else:
            preds = [r["parsed"] for r in rows]
            m = classification_metrics(labels, gold, preds)
            strict_pred = [r["parsed"] if r["strict"] else None for r in rows]
            n_valid = sum(p is not None for p in preds)
            extra_m = {"accuracy_strict": round(sum(g == p for g, p in zip(gold, strict_pred)) / n, 6),
                       "valid_rate": round(n_valid / n, 6), "valid_rate_ci95": wilson(n_valid, n),
                       "valid_rates": {"strict": round(sum(p is not None for p in strict_pred) / n, 6),
                                       "lenient": round(n_valid / n, 6)}}
        n_right = sum(bool(r["correct"]) for r in rows)
        ci = {"accuracy_ci95": wilson(n_right, n), "macro_f1_ci95": bootstrap_macro_f1(labels, gold, preds, seed=seed),
              "intervals": {"level": 0.95, "proportions": "wilson",
                            "macro_f1": f"bootstrap percentile over items, 1000 resamples, seed {seed}"}}
        sc = None
        if samples > 1:
            all_samples = [s for r in rows for s in r["samples"]]
            sc = {"samples": samples, "ties": sum(bool(r["tie"]) for r in rows), "tie_rule": "earliest sample's label",
                  "unanimous": sum(len(r["votes"]) == 1 and max(r["votes"].values()) == samples for r in rows),
                  "valid_sample_rate": round(sum(s["parsed"] is not None for s in all_samples) / len(all_samples), 6)}
            if sc["ties"]:
                log(f"self-consistency: {sc['ties']} of {n} items had a tied vote (earliest sample's label taken)")
        fewer = [r for r in rows if shots and r.get("shots", shots) < shots]
        if fewer:
            log(f"few-shot: {len(fewer)} of {n} items got fewer than {shots} shots to fit n_ctx {n_ctx} "
                "(shots are dropped, the question is never cut)")
        systems = sorted({system_prompt(flavor, it.options) for it in items})
        results = {
            "schema": 1, "task": task, "mode": mode, "split": params["split"], "n": n, "seed": seed,
            "model": {"path": str(model_path.resolve()), "name": model_path.name, "sha256": sha256_file(model_path)},
            "data": {"path": str(data_path.resolve()), "sha256": sha256_file(data_path)},
            **m, **extra_m, **ci,
            "sampling": samp if mode == "generate" else None,
            "max_tokens": max_tokens if mode == "generate" else None,
            "full_answer": full_answer if mode == "generate" else None,
            "n_ctx": n_ctx,
            "n_gpu_layers": ngl_used,
            "prompt": {"template": template, "format": PROMPT_FORMAT,
                       "system_sha256": [sha256_bytes(s) for s in systems]},
            "tokens": {"prompt_total": sum(r["prompt_tokens"] for r in rows),
                       "prompt_mean": round(sum(r["prompt_tokens"] for r in rows) / n, 3),
                       "generated_total": sum(r.get("gen_tokens", 0) for r in rows)},
            "rag": params["rag"],
        }
        if task == "mcq":
            results["flavor"] = flavor
            results["map"] = field_map or None
        if shots or cot or samples > 1:
            results["cot"] = cot
            results["samples"] = samples
            results["self_consistency"] = sc
            results["shots"] = None if not shots else {
                "k": shots, "ids": [s.id for s in shot_items], "stratified": flavor == "pubmedqa",
                "source": {"path": str(dev_path.resolve()), "sha256": sha256_file(dev_path)},
                "excluded_as_test_items": excluded, "items_with_fewer_shots": len(fewer),
                "min_shots_used": min((r.get("shots", shots) for r in rows), default=shots)}
        write_json(st.path("results.json"), results)
        write_jsonl(st.path("items.jsonl"), rows)
        from .render import render_bench_report
        render_bench_report(results, rows, st.path("report.md").parent, plots=plots)
        st.lineage.licenses.add("MIT")
        st.lineage.sources.add(f"{task} ({data_path.name})")
        st.extra.update({"accuracy": results["accuracy"], "valid_rate": results["valid_rate"], "n": n,
                         "accuracy_ci95": results["accuracy_ci95"], "resumed_from_item": resumed or None,
                         "timing": {"wall_s": round(wall, 3), "load_s": round(t_load, 3),
                                    "items_per_s": round((n - resumed) / wall, 4) if wall and n > resumed else None,
                                    "s_per_item": round(wall / max(1, n - resumed), 4), "evaluated_tokens": evaluated,
                                    "threads": threads_used}})
    scratch.unlink(missing_ok=True)
    return st.result


def _run_item(lr, it: Item, flavor: str, mode: str, seed: int, samples: int, cot: bool, full_answer: bool,
              max_tokens: int, samp: dict, turns_all: list[dict], shots: int, retriever, fit_context, k: int,
              prefixes: dict, item_seed) -> dict:
    system = system_prompt(flavor, it.options)
    row: dict = {"id": it.id, "gold": it.answer}
    rag_text = ""
    opts = list(it.options)
    room = max_tokens if mode == "generate" else max(lr.count_tokens(answer_text(flavor, lab, it)) for lab in opts)
    if retriever is not None:
        qb = question_block(flavor, it)
        chunks = retriever.search(it.question, k)
        rag_text, kept = fit_context(system, qb, chunks, lr.count_tokens, lr.n_ctx, room + 24)
        row["chunks"] = [{"id": c.get("id"), "score": round(float(c.get("score", 0.0)), 6)} for c in kept]
    user = user_message(flavor, it, rag_text)
    if cot:
        user += "\n\n" + extract.cot_instruction(flavor, opts)
    n_shots = shots
    while True:
        head = [{"role": "system", "content": system}, *turns_all[: 2 * n_shots]]
        prompt = lr.render_messages([*head, {"role": "user", "content": user}])
        # the prompt must leave room for the answer: drop shots (the last first), never cut the question
        fits = len(lr.tokenize(prompt)) + room + 1 <= lr.n_ctx
        if fits or n_shots == 0:
            break
        n_shots -= 1
    if shots and not fits:
        raise UserError(f"item {it.id}: the question alone needs {len(lr.tokenize(prompt))} prompt tokens + {room} for "
                        f"the answer, more than n_ctx {lr.n_ctx} (questions are never cut)", field="--n-ctx")
    if shots:
        row["shots"] = n_shots
    key = (system, n_shots)
    if key not in prefixes:
        prefixes[key] = lr.prefix_for_messages(head)
    lr.set_prefix(prefixes[key])
    row["prompt_sha256"] = sha256_bytes(prompt)
    if mode == "loglik":
        conts = []
        ptoks = None
        for lab in opts:
            ctx_toks, cont = lr.split_continuation(prompt, answer_text(flavor, lab, it))
            ptoks = ctx_toks
            conts.append(cont)
        scores = lr.score(ptoks, conts)
        ll = {lab: round(s[0], 6) for lab, s in zip(opts, scores)}
        norm = {lab: s[0] / max(1, len(answer_text(flavor, lab, it).encode("utf-8"))) for lab, s in zip(opts, scores)}
        pred = max(opts, key=lambda lab: (ll[lab], -opts.index(lab)))
        pred_norm = max(opts, key=lambda lab: (norm[lab], -opts.index(lab)))
        row.update({"prompt_tokens": len(ptoks), "loglik": ll, "pred": pred, "pred_norm": pred_norm,
                    "correct": pred == it.answer, "correct_norm": pred_norm == it.answer})
        return row
    ptoks = lr.tokenize(prompt)

    def parse(text, final):
        if cot:
            return extract.parse_cot(flavor, text, opts, final=final)
        return extract.parse(flavor, text, opts, final=final)

    def decided(text):
        return parse(text, False).decided
    dec = None if full_answer else decided
    if samples == 1:
        text, ng, reason = lr.generate(ptoks, max_tokens=max_tokens, sampling=samp, seed=item_seed(seed, it.id),
                                       decided=dec)
        p = parse(text, True)
        row.update({"prompt_tokens": len(ptoks), "raw": text, "parsed": p.label, "strict": p.strict,
                    "finish": reason, "gen_tokens": ng, "correct": p.label == it.answer})
        return row
    seeds = [item_seed(seed, f"{it.id}#{j}") for j in range(samples)]
    draws = lr.generate_samples(ptoks, seeds, max_tokens=max_tokens, sampling=samp, decided=dec)
    parsed = [(text, ng, reason, parse(text, True)) for text, ng, reason in draws]
    winner, votes, tie = majority([p.label for *_, p in parsed])
    lead = next((d for d in parsed if d[3].label == winner), parsed[0])
    row.update({"prompt_tokens": len(ptoks), "raw": lead[0], "parsed": winner,
                "strict": any(p.strict and p.label == winner for *_, p in parsed) if winner else False,
                "votes": dict(sorted(votes.items())), "tie": tie,
                "samples": [{"raw": t, "parsed": p.label, "finish": r, "gen_tokens": g} for t, g, r, p in parsed],
                "finish": lead[2], "gen_tokens": sum(g for _, g, _, _ in parsed), "correct": winner == it.answer})
    return row


def summary_lines(task: str, res: dict, art: Artifact) -> list[str]:
    """The lines `tools bench` prints: figures with their 95 % intervals, then self-consistency."""
    def ci(key):
        v = res.get(key)
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""
    line = (f"{task} {res['mode']}: n={res['n']} accuracy={res['accuracy']:.3f}{ci('accuracy_ci95')} "
            f"valid={res['valid_rate']:.3f}{ci('valid_rate_ci95')} macro_f1={res['macro_f1']:.3f}{ci('macro_f1_ci95')}")
    if res["mode"] == "loglik":
        line += f" accuracy_norm={res['accuracy_norm']:.3f}"
    t = art.extra.get("timing", {})
    if t:
        line += f" ({t.get('s_per_item')} s/item)"
    lines = [line]
    sc = res.get("self_consistency")
    if sc:
        lines.append(f"self-consistency: {sc['samples']} samples an item, {sc['ties']} tied votes")
    return lines
