"""`tools eval suite open-medical`: the Open Medical-LLM Leaderboard's nine tasks on a GGUF, offline.

The leaderboard runs lm-eval zero-shot by log-likelihood (``acc``) on medmcqa, medqa_4options,
pubmedqa and six MMLU subjects; lm-eval fetches those datasets from the Hub at run time. Here each
task is **lm-eval's own installed task file** (``lm_eval/tasks/{medmcqa,medqa,pubmedqa,mmlu}``:
doc_to_text, choices, target delimiter, description, metrics) built as a ``ConfigurableTask`` over
docs read from ``evals/data`` (or ``--data TASK=FILE``) in the schema of the Hub dataset it names.
lm-eval renders every context and continuation and its ``process_results`` gives acc / acc_norm;
only the model call is ours: ``LlamaRunner.score`` (one prompt evaluation per question, every
choice scored from it, the task's shared token prefix kept in the KV cache).

Artifact (stage ``eval.suite.open-medical``): ``results.json`` (per task n, acc with its 95 % Wilson
interval, acc_norm where lm-eval's task defines it, data source and sha256; the unweighted average
over the tasks run; the tasks skipped and why), ``<task>/items.jsonl``, ``report.md`` (a per-task
table and a leaderboard-style row) and ``suite.png``. Finished questions go to a scratch file
beside OUT (``evals.bench.scratch_path``), so a killed run continues where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import datasets
import lm_eval
from lm_eval.api.task import ConfigurableTask

from tools.artifact import Artifact, Stage
from tools.errors import UserError
from tools.ggufpath import resolve_gguf
from tools.io import sha256_bytes, sha256_file, write_json, write_jsonl
from tools.llm import LlamaRunner, common_prefix
from tools.paths import bundled_data, embedded_gguf
from tools.progress import log, progress

from .bench import _read_scratch, scratch_path
from .items import load_items
from .lm_eval_tasks.utils import mmlu_csv
from .mcq import medmcqa_docs
from .render import render_suite_report, suite_rows
from .stats import wilson
from .suitespec import SuiteRunSpec

LM_EVAL_TASKS = Path(lm_eval.__file__).resolve().parent / "tasks"


def _medqa_docs(path: Path) -> list[dict]:
    """MedQA items -> GBaker/MedQA-USMLE-4-options-hf rows (sent1, ending0..3, label)."""
    docs = []
    for it in load_items("medqa", path)[0]:
        if list(it.options) != ["A", "B", "C", "D"]:
            raise UserError(f"item {it.id}: medqa_4options needs options A-D, got {list(it.options)}", path=str(path),
                            field="options")
        docs.append({"id": it.id, "sent1": it.question, "sent2": "", "label": "ABCD".index(it.answer),
                     **{f"ending{i}": it.options[k] for i, k in enumerate("ABCD")}})
    return docs


def _pubmedqa_docs(path: Path) -> list[dict]:
    """PubMedQA items -> bigbio/pubmed_qa source rows (QUESTION, CONTEXTS, final_decision)."""
    return [{"pubid": it.id, "QUESTION": it.question, "CONTEXTS": it.context.split("\n"), "final_decision": it.answer}
            for it in load_items("pubmedqa", path)[0]]


def _mmlu_docs(path: Path, subject: str) -> list[dict]:
    return mmlu_csv(path, subject)


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: lm-eval's task file and how our data becomes its docs."""

    name: str                          # lm-eval's task name
    column: str                        # the leaderboard's column
    yaml: str                          # relative to lm_eval/tasks
    bundled: str | None                # relative to evals/data; None: only from --data
    docs: Callable[[Path], list[dict]]


MMLU_MEDICAL = (("anatomy", "Anatomy"), ("clinical_knowledge", "Clinical Knowledge"),
                ("college_biology", "College Biology"), ("college_medicine", "College Medicine"),
                ("medical_genetics", "Medical Genetics"), ("professional_medicine", "Professional Medicine"))

OPEN_MEDICAL = (
    SuiteTask("medmcqa", "MedMCQA", "medmcqa/medmcqa.yaml", None, medmcqa_docs),
    SuiteTask("medqa_4options", "MedQA", "medqa/medqa.yaml", "medqa/test.jsonl", _medqa_docs),
    SuiteTask("pubmedqa", "PubMedQA", "pubmedqa/pubmedqa.yaml", "pubmedqa/test.jsonl", _pubmedqa_docs),
    *(SuiteTask(f"mmlu_{s}", f"MMLU {title}", f"mmlu/default/mmlu_{s}.yaml", f"mmlu_medical/test/{s}_test.csv",
                partial(_mmlu_docs, subject=s)) for s, title in MMLU_MEDICAL),
)
# the leaderboard's column order (Average first)
LEADERBOARD_ORDER = ("medmcqa", "pubmedqa", *(f"mmlu_{s}" for s, _ in MMLU_MEDICAL), "medqa_4options")


def task_config(yaml_rel: str) -> dict:
    """lm-eval's own config of a task (includes and ``!function`` resolved by lm-eval's loader)."""
    path = LM_EVAL_TASKS / yaml_rel
    if not path.is_file():
        raise UserError(f"lm-eval {lm_eval_version()} has no task file {yaml_rel}", path=str(path))
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
        return load_yaml(path, resolve_func=True, recursive=True)
    except ImportError:  # lm-eval < 0.4.10
        from lm_eval.utils import load_yaml_config
        return load_yaml_config(yaml_path=str(path), mode="full")


def build_task(t: SuiteTask, docs: list[dict]) -> ConfigurableTask:
    """lm-eval's task ``t`` whose test split is ``docs`` (no Hub: a custom_dataset returns them)."""
    cfg = task_config(t.yaml)
    split = cfg["test_split"]
    ds = datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    cfg.update(custom_dataset=lambda **_: ds, dataset_path=t.name, dataset_name=None, dataset_kwargs=None,
               num_fewshot=0)
    for key in ("training_split", "validation_split", "fewshot_split"):
        if cfg.get(key) not in (None, split):
            cfg[key] = None  # zero-shot: no other split is read
    cfg.pop("tag", None)
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "custom kwargs can be passed to --metadata" advice is for its own CLI
    try:
        return ConfigurableTask(config=cfg)
    finally:
        quiet.setLevel(level)


def task_requests(task: ConfigurableTask, limit: int | None) -> list[tuple[dict, str, list[str]]]:
    """(doc, context, continuations) per question, in doc order: the requests lm-eval itself builds."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    out = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        ctxs = {i.args[0] for i in insts}
        if len(ctxs) != 1:
            raise UserError(f"{task.config.task}: doc {doc_id} has {len(ctxs)} contexts (expected one)")
        out.append((insts[0].doc, insts[0].args[0], [i.args[1] for i in insts]))
    return out


def lm_eval_version() -> str:
    return version("lm_eval")


@dataclass(frozen=True)
class SuiteSpec(SuiteRunSpec):
    """One suite run: `tools eval suite open-medical`'s options (all shared with the other protocols)."""


@dataclass
class _Key:
    id: str


def resolve_data(spec: SuiteSpec) -> tuple[dict[str, Path], dict[str, str]]:
    """(task -> data file, task skipped -> why); --data names must be suite tasks."""
    names = {t.name for t in OPEN_MEDICAL}
    for name in spec.data:
        if name not in names:
            raise UserError(f"unknown task {name!r} (one of {', '.join(sorted(names))})", field="--data")
    files, skipped = {}, {}
    for t in OPEN_MEDICAL:
        if t.name in spec.data:
            files[t.name] = Path(spec.data[t.name])
        elif t.bundled:
            files[t.name] = bundled_data() / t.bundled
        else:
            skipped[t.name] = (f"no data shipped (evals/data/{t.name}/SOURCE.md): pass --data {t.name}=FILE")
    for name, p in files.items():
        if not p.is_file():
            raise UserError("data file not found", path=str(p), field=f"--data {name}")
    return files, skipped


def load_tasks(spec: SuiteSpec, files: dict[str, Path]) -> list[tuple[SuiteTask, ConfigurableTask, list]]:
    out = []
    for t in OPEN_MEDICAL:
        if t.name not in files:
            continue
        loader = partial(t.docs, answer_base=spec.answer_base) if t.name == "medmcqa" else t.docs
        task = build_task(t, loader(files[t.name]))
        out.append((t, task, task_requests(task, spec.limit)))
    return out


def _score_item(lr: LlamaRunner, task: ConfigurableTask, doc: dict, ctx: str, conts: list[str]) -> dict:
    """One question: every continuation scored from one evaluation of the context; lm-eval's metrics."""
    split = [lr.split_continuation(ctx, c) for c in conts]
    ctx_toks = split[0][0]
    scores = lr.score(ctx_toks, [c for _, c in split])
    metrics = task.process_results(doc, [(float(ll), bool(g)) for ll, g in scores])
    lls = [round(float(ll), 6) for ll, _ in scores]
    return {"gold": task.doc_to_target(doc), "loglik": lls, "pred": max(range(len(lls)), key=lambda i: (lls[i], -i)),
            "prompt_sha256": sha256_bytes(ctx), "prompt_tokens": len(ctx_toks),
            **{k: float(v) for k, v in metrics.items() if k in ("acc", "acc_norm")}}


def _score_all(lr: LlamaRunner, loaded: list, rows: list[dict], scratch: Path) -> None:
    """Score every question not in ``rows`` yet, appending each to ``scratch`` as it finishes."""
    total = sum(len(reqs) for _, _, reqs in loaded)
    done = len(rows)
    with open(scratch, "a", encoding="utf-8") as sf, \
            progress("open-medical", total=total, unit="questions") as advance:
        advance(done)
        seen = 0
        for t, task, reqs in loaded:
            if seen + len(reqs) <= done:
                seen += len(reqs)
                continue
            lr.set_prefix(common_prefix([lr.tokenize(ctx) for _, ctx, _ in reqs]))
            for i, (doc, ctx, conts) in enumerate(reqs):
                if seen + i < done:
                    continue
                row = {"id": f"{t.name}/{i}", "task": t.name, "doc": i, **_score_item(lr, task, doc, ctx, conts)}
                sf.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                sf.flush()
                rows.append(row)
                advance(1)
            seen += len(reqs)


def _task_results(t: SuiteTask, rows: list[dict], path: Path, source: str) -> dict:
    n = len(rows)
    k = int(sum(r["acc"] for r in rows))
    res = {"column": t.column, "lm_eval_task": t.name, "n": n, "acc": round(k / n, 6), "acc_ci95": wilson(k, n),
           "acc_norm": None, "acc_norm_ci95": None,
           "data": {"path": str(path.resolve()), "sha256": sha256_file(path), "source": source}}
    if all("acc_norm" in r for r in rows):
        kn = int(sum(r["acc_norm"] for r in rows))
        res.update(acc_norm=round(kn / n, 6), acc_norm_ci95=wilson(kn, n))
    return res


def run_suite(spec: SuiteSpec) -> Artifact:
    """Run the Open Medical-LLM suite on a GGUF (see the module docstring)."""
    if spec.limit is not None and spec.limit < 1:
        raise UserError("must be at least 1", field="--limit")
    if spec.answer_base not in (None, 0, 1):
        raise UserError("must be 0 or 1", field="--answer-base")
    model = resolve_gguf(spec.model, "--model") if spec.model else embedded_gguf()
    files, skipped = resolve_data(spec)
    out = Path(spec.out) if spec.out else Path("runs") / "eval" / f"open-medical-{model.stem}"
    params = {"suite": "open-medical", "limit": spec.limit, "n_ctx": spec.n_ctx, "answer_base": spec.answer_base,
              "tasks": sorted(files), "skipped": sorted(skipped), "lm_eval": lm_eval_version(),
              "data": {k: ("--data" if k in spec.data else "bundled") for k in sorted(files)}}
    with Stage("eval.suite.open-medical", out, params, inputs=[model, *files.values()], force=spec.force,
               log=log) as st:
        if st.skipped:
            return st.result
        for name, why in skipped.items():
            log(f"open-medical: {name} skipped: {why}")
        loaded = load_tasks(spec, files)
        keys = [_Key(f"{t.name}/{i}") for t, _, reqs in loaded for i in range(len(reqs))]
        scratch = scratch_path(out, st.fingerprint)
        rows = _read_scratch(scratch, keys)
        scratch.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                           encoding="utf-8")
        resumed = len(rows)
        if resumed:
            log(f"resuming: {resumed} of {len(keys)} questions already done ({scratch})")
        t0 = time.perf_counter()
        with LlamaRunner(model, n_ctx=spec.n_ctx, n_threads=spec.threads, n_gpu_layers=spec.n_gpu_layers) as lr:
            lr.evaluated_tokens = 0
            _score_all(lr, loaded, rows, scratch)
            evaluated, threads = lr.evaluated_tokens, lr.n_threads
        wall = time.perf_counter() - t0
        results = _results(spec, model, loaded, rows, files, skipped)
        for t, _, _ in loaded:
            write_jsonl(st.path(f"{t.name}/items.jsonl"), [r for r in rows if r["task"] == t.name])
        write_json(st.path("results.json"), results)
        render_suite_report(results, st.path("report.md").parent, plots=spec.plots)
        st.lineage.licenses.add("MIT")
        st.lineage.sources.update(f"{t.column} ({files[t.name].name})" for t, _, _ in loaded)
        st.extra.update({"average": results["average"], "n": results["n"], "resumed_from_item": resumed or None,
                         "timing": {"wall_s": round(wall, 3), "s_per_item": round(wall / max(1, len(keys)), 4),
                                    "evaluated_tokens": evaluated, "threads": threads}})
    scratch.unlink(missing_ok=True)
    return st.result


def _results(spec: SuiteSpec, model: Path, loaded: list, rows: list[dict], files: dict, skipped: dict) -> dict:
    tasks = {t.name: _task_results(t, [r for r in rows if r["task"] == t.name], files[t.name],
                                   "--data" if t.name in spec.data else "bundled") for t, _, _ in loaded}
    avg = round(sum(v["acc"] for v in tasks.values()) / len(tasks), 6) if tasks else None
    return {"schema": 1, "suite": "open-medical", "limit": spec.limit, "n": len(rows), "shots": 0,
            "metric": "acc (lm-eval multiple_choice: argmax of summed log-likelihood)",
            "model": {"path": str(model.resolve()), "name": model.name, "sha256": sha256_file(model)},
            "lm_eval_version": lm_eval_version(), "tasks": tasks,
            "skipped": skipped, "average": avg, "average_over": sorted(tasks),
            "order": [n for n in LEADERBOARD_ORDER if n in tasks or n in skipped],
            "columns": {t.name: t.column for t in OPEN_MEDICAL},
            "tokens": {"prompt_total": sum(r["prompt_tokens"] for r in rows)}}


def summary_lines(res: dict) -> list[str]:
    """One line per task (acc with its interval), then the average."""
    lines = []
    for col, v, why in suite_rows(res):
        if why is not None:
            lines.append(f"{col:28s}     -  skipped: {why}")
            continue
        lo, hi = v["acc_ci95"]
        lines.append(f"{col:28s} {v['n']:5d}  {100 * v['acc']:5.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]")
    over = len(res["average_over"])
    lines.append(f"{'average':28s} {res['n']:5d}  {100 * (res['average'] or 0):5.1f}%  (unweighted, {over} tasks)")
    return lines
