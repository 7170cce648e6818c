"""`tools eval suite meditron`: Meditron's evaluation protocol on a GGUF, offline, as one table.

Meditron's protocol (epfLLM/meditron ``evaluation/``): PubMedQA test, MedMCQA validation, MedQA test with
5 options (its ``medqa``) and with 4 (``medqa4``), MMLU-medical (nine subjects, test); answers are generated
and extracted, an answer that cannot be read counts wrong and is counted ("unable to find answer"); few-shot
examples are drawn anew for each of several seeds and the seeds' accuracies give a mean and a spread; chain
of thought and self-consistency (majority of N sampled answers) are options.

Everything on the model side is `tools bench`'s, not a second loop: each task (MMLU: each subject) and seed is a
``BenchSpec`` planned by ``evals.bench.plan_bench`` (MediLoRA's chat prompts, shots never a test item, top-40
sampling, ``evals.extract``: text inside ``<think>`` is never the answer) and run by ``evals.bench.run_items``
on one loaded model, each with its own scratch file, so a killed run resumes per item. Not Meditron's: its
prompt texts and vLLM decoding; the numbers sit beside its table, they do not reproduce it.

Artifact (stage ``eval.suite.meditron``): ``results.json`` (per task and seed: n, accuracy with its Wilson
interval, unparseable count; per task: the mean over seeds, its sample SD, a 95 % interval, unparseable count
and rate; the average), ``<task>/items.jsonl`` (bench rows plus ``seed`` and, for MMLU, ``subject``),
``report.md`` (per-task table and a row laid out like Meditron's) and ``suite.png``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tools.artifact import Artifact, Stage
from tools.errors import UserError
from tools.ggufpath import resolve_gguf
from tools.io import sha256_file, write_json, write_jsonl
from tools.llm import SAMPLING_DEFAULTS, LlamaRunner
from tools.paths import bundled_data, embedded_gguf
from tools.progress import log

from .bench import PROMPT_FORMAT, BenchSpec, plan_bench, run_items, scratch_path
from .lm_eval_tasks.utils import SUBJECTS
from .mcq import MEDMCQA_OPTIONS
from .render import render_meditron_report, suite_rows
from .stats import wilson
from .suitespec import SuiteRunSpec

MEDMCQA_MAP = {"question": ["question"], "options": list(MEDMCQA_OPTIONS), "answer": ["cop"]}


@dataclass(frozen=True)
class MeditronTask:
    """One benchmark of Meditron's table and the bench task that asks it."""

    name: str                # Meditron's benchmark name
    column: str              # its column in Meditron's table
    bench: str               # the bench task: pubmedqa | medqa | mcq
    test: str | None         # bundled test data, relative to evals/data (MMLU: the folder); None: --data only
    dev: str | None          # bundled few-shot pool


# Meditron's table order (Average last)
MEDITRON = (
    MeditronTask("mmlu_medical", "MMLU-Medical", "mcq", "mmlu_medical", "mmlu_medical"),
    MeditronTask("pubmedqa", "PubMedQA", "pubmedqa", "pubmedqa/test.jsonl", "pubmedqa/dev.jsonl"),
    MeditronTask("medmcqa", "MedMCQA", "mcq", None, None),
    MeditronTask("medqa", "MedQA", "medqa", "medqa5/test.jsonl", "medqa5/dev.jsonl"),
    MeditronTask("medqa4", "MedQA-4-Option", "medqa", "medqa/test.jsonl", "medqa/dev.jsonl"),
)
TASK_NAMES = tuple(t.name for t in MEDITRON)


@dataclass(frozen=True)
class MeditronSpec(SuiteRunSpec):
    """One run: `tools eval suite meditron`'s options (the shared ones, then the protocol's own)."""

    dev: dict[str, str] = field(default_factory=dict)    # task -> few-shot pool (mmlu_medical: folder)
    tasks: tuple[str, ...] | None = None                 # None: all five
    shots: int = 5
    seeds: int = 3
    cot: bool = False
    samples: int = 1
    max_tokens: int | None = None


@dataclass(frozen=True)
class Unit:
    """One bench plan's data: a task, or one MMLU subject of it."""

    task: MeditronTask
    subject: str | None
    test: Path
    dev: Path | None

    @property
    def key(self) -> str:
        return f"{self.task.name}.{self.subject}" if self.subject else self.task.name


def _check(spec: MeditronSpec) -> None:
    for value, flag, low in ((spec.limit, "--limit", 1), (spec.seeds, "--seeds", 1), (spec.samples, "--samples", 1),
                             (spec.max_tokens, "--max-tokens", 1), (spec.shots, "--shots", 0)):
        if value is not None and value < low:
            raise UserError(f"must be at least {low}", field=flag)
    if spec.answer_base not in (None, 0, 1):
        raise UserError("must be 0 or 1", field="--answer-base")
    for flag, names in (("--data", spec.data), ("--dev", spec.dev), ("--tasks", spec.tasks or ())):
        for name in names:
            if name not in TASK_NAMES:
                raise UserError(f"unknown task {name!r} (one of {', '.join(TASK_NAMES)})", field=flag)


def _path(spec_map: dict[str, str], t: MeditronTask, bundled: str | None, flag: str) -> Path | None:
    if t.name in spec_map:
        p = Path(spec_map[t.name])
    elif bundled:
        p = bundled_data() / bundled
    else:
        return None
    if not (p.is_dir() if t.name == "mmlu_medical" else p.is_file()):
        raise UserError(f"{'folder' if t.name == 'mmlu_medical' else 'data file'} not found", path=str(p),
                        field=f"{flag} {t.name}")
    return p


def resolve_units(spec: MeditronSpec) -> tuple[list[Unit], dict[str, str]]:
    """(the bench units of the tasks that run, in table order; task not run -> why)."""
    _check(spec)
    units, not_run = [], {}
    for t in MEDITRON:
        if spec.tasks is not None and t.name not in spec.tasks:
            not_run[t.name] = "not selected (--tasks)"
            continue
        test = _path(spec.data, t, t.test, "--data")
        if test is None:
            not_run[t.name] = f"no data shipped (evals/data/{t.name}/SOURCE.md): pass --data {t.name}=FILE"
            continue
        dev = _path(spec.dev, t, t.dev, "--dev") if spec.shots else None
        if spec.shots and dev is None:
            raise UserError(f"{spec.shots} shots need a pool of {t.column} examples that are not test items "
                            f"(Meditron draws them from the train split, not shipped): pass --dev {t.name}=FILE "
                            "or --shots 0", field="--dev")
        if t.name == "mmlu_medical":
            units += [Unit(t, s, test / "test" / f"{s}_test.csv", dev / "dev" / f"{s}_dev.csv" if dev else None)
                      for s in SUBJECTS]
        else:
            units.append(Unit(t, None, test, dev))
    if not units:
        raise UserError("no task to run", field="--tasks")
    return units, not_run


def unit_spec(spec: MeditronSpec, unit: Unit, seed: int) -> BenchSpec:
    """The bench run of one unit and seed (generation, the suite's shots, CoT and samples)."""
    fm = None
    if unit.task.name == "medmcqa":
        fm = {**MEDMCQA_MAP, **({"answer_base": [str(spec.answer_base)]} if spec.answer_base is not None else {})}
    return BenchSpec(task=unit.task.bench, model=spec.model, data=unit.test, dev=unit.dev, limit=spec.limit,
                     seed=seed, threads=spec.threads, mode="generate", max_tokens=spec.max_tokens, n_ctx=spec.n_ctx,
                     n_gpu_layers=spec.n_gpu_layers, shots=spec.shots, cot=spec.cot, samples=spec.samples,
                     field_map=fm, plots=False)


def unit_scratch(out: Path, fingerprint: str, key: str, seed: int) -> Path:
    """Where the finished items of one unit (``Unit.key``) and seed wait for the run's end, beside OUT."""
    base = scratch_path(out, fingerprint)
    return base.with_name(f"{base.stem}.{key}.seed{seed}.jsonl")


def _params(spec: MeditronSpec, units: list[Unit], not_run: dict[str, str]) -> dict:
    tasks = sorted({u.task.name for u in units})
    return {"suite": "meditron", "tasks": tasks, "not_run": sorted(not_run), "limit": spec.limit,
            "shots": spec.shots, "seeds": list(range(spec.seeds)), "cot": spec.cot, "samples": spec.samples,
            "max_tokens": spec.max_tokens, "n_ctx": spec.n_ctx, "answer_base": spec.answer_base,
            "sampling": SAMPLING_DEFAULTS, "prompt_format": PROMPT_FORMAT,
            "data": {k: ("--data" if k in spec.data else "bundled") for k in tasks},
            "dev": {k: ("--dev" if k in spec.dev else "bundled") for k in tasks} if spec.shots else None}


def run_meditron(spec: MeditronSpec) -> Artifact:
    """Run Meditron's protocol on a GGUF (see the module docstring)."""
    units, not_run = resolve_units(spec)
    model = resolve_gguf(spec.model, "--model") if spec.model else embedded_gguf()
    spec = replace(spec, model=model)
    out = Path(spec.out) if spec.out else Path("runs") / "eval" / f"meditron-{model.stem}"
    inputs = [model, *dict.fromkeys(p for u in units for p in (u.test, u.dev) if p)]
    with Stage("eval.suite.meditron", out, _params(spec, units, not_run), inputs=inputs, force=spec.force,
               log=log) as st:
        if st.skipped:
            return st.result
        for name, why in not_run.items():
            log(f"meditron: {name} not run: {why}")
        plans = [(u, s, plan_bench(unit_spec(spec, u, s))) for u in units for s in range(spec.seeds)]
        t0 = time.perf_counter()
        runs, facts = _run_plans(spec, model, plans, out, st.fingerprint)
        wall = time.perf_counter() - t0
        results = meditron_results(spec, model, runs, not_run)
        for t in {u.task.name: u.task for u in units}.values():
            write_jsonl(st.path(f"{t.name}/items.jsonl"), item_rows(runs, t.name))
        write_json(st.path("results.json"), results)
        render_meditron_report(results, st.path("report.md").parent, plots=spec.plots)
        st.lineage.licenses.add("MIT")
        st.lineage.sources.update(f"{u.task.column} ({u.test.name})" for u in units)
        n_gen = sum(len(r["rows"]) for r in runs)
        st.extra.update({"average": results["average"], "n": results["n"],
                         "resumed_items": facts["resumed"] or None,
                         "timing": {"wall_s": round(wall, 3), "load_s": facts["load_s"],
                                    "s_per_item": round(wall / max(1, n_gen - facts["resumed"]), 4),
                                    "evaluated_tokens": facts["evaluated"], "threads": facts["threads"]}})
    for u, s, _ in plans:
        unit_scratch(out, st.fingerprint, u.key, s).unlink(missing_ok=True)
    return st.result


def _run_plans(spec: MeditronSpec, model: Path, plans: list, out: Path, fingerprint: str) -> tuple[list[dict], dict]:
    """Every plan through the bench item loop on one loaded model; (runs, what the runs measured)."""
    t0 = time.perf_counter()
    runs, facts = [], {"resumed": 0, "evaluated": 0, "threads": None}
    with LlamaRunner(model, n_ctx=spec.n_ctx, n_threads=spec.threads, n_gpu_layers=spec.n_gpu_layers) as lr:
        facts["load_s"] = round(time.perf_counter() - t0, 3)
        for u, s, plan in plans:
            rows, run = run_items(plan, unit_scratch(out, fingerprint, u.key, s), lr, label=f"meditron {u.key} seed {s}")
            facts["resumed"] += run.resumed
            facts["evaluated"] += run.evaluated
            facts["threads"] = run.threads
            runs.append({"task": u.task.name, "subject": u.subject, "seed": s, "rows": rows, "plan": plan})
    return runs, facts


def item_rows(runs: list[dict], task: str) -> list[dict]:
    """A task's item rows, seed by seed (MMLU: subject by subject within a seed), each tagged with both."""
    out = []
    for r in sorted((r for r in runs if r["task"] == task), key=lambda r: r["seed"]):
        tag = {"seed": r["seed"], **({"subject": r["subject"]} if r["subject"] else {})}
        out += [{**row, **tag} for row in r["rows"]]
    return out


# ---- results: a pure function of the item rows -------------------------------------------------

def seed_figures(rows: list[dict]) -> dict:
    """One seed of one task: n, correct, accuracy (an unparseable answer is wrong) and unparseable count."""
    n = len(rows)
    k = sum(bool(r["correct"]) for r in rows)
    bad = sum(r["parsed"] is None for r in rows)
    return {"n": n, "correct": k, "accuracy": round(k / n, 6), "accuracy_ci95": wilson(k, n), "unparseable": bad,
            "unparseable_rate": round(bad / n, 6)}


def task_figures(by_seed: dict[int, list[dict]]) -> dict:
    """Mean and sample SD of the seeds' accuracies; a 95 % Wilson interval over the items, each counted as
    its share of seeds answered right (conservative: a share varies less than a 0/1 answer); unparseable
    answers over all seeds, and accuracy on the parsed ones only (Meditron's "calibrated" accuracy)."""
    per = [{"seed": s, **seed_figures(rows)} for s, rows in sorted(by_seed.items())]
    n = per[0]["n"]
    if any(p["n"] != n for p in per):
        raise UserError(f"seeds ran different item counts: {[p['n'] for p in per]}")
    accs = [p["correct"] / n for p in per]
    total, right, bad = n * len(per), sum(p["correct"] for p in per), sum(p["unparseable"] for p in per)
    return {"n": n, "seeds": [p["seed"] for p in per], "accuracy": round(statistics.fmean(accs), 6),
            "accuracy_sd": round(statistics.stdev(accs), 6) if len(accs) > 1 else None,
            "accuracy_range": [round(min(accs), 6), round(max(accs), 6)],
            "accuracy_ci95": wilson(right / len(per), n), "unparseable": bad,
            "unparseable_rate": round(bad / total, 6),
            "accuracy_parsed": round(right / (total - bad), 6) if total > bad else None, "per_seed": per}


def _shots(runs: list[dict]) -> list[dict]:
    return [{"seed": r["seed"], **({"subject": r["subject"]} if r["subject"] else {}),
             "ids": [it.id for it in r["plan"].shots.items],
             "min_used": min((row.get("shots", r["plan"].shots.k) for row in r["rows"]), default=0)}
            for r in runs if r["plan"].shots.k]


def _task_block(t: MeditronTask, runs: list[dict]) -> dict:
    by_seed: dict[int, list[dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).extend(r["rows"])
    res = {"column": t.column, **task_figures(by_seed), "shots": _shots(runs) or None,
           "data": [{"path": str(p.resolve()), "sha256": sha256_file(p)}
                    for p in dict.fromkeys(r["plan"].data_path for r in runs)]}
    if t.name == "mmlu_medical":
        subj: dict[str, dict[int, list[dict]]] = {}
        for r in runs:
            subj.setdefault(r["subject"], {})[r["seed"]] = r["rows"]
        res["subjects"] = {s: {k: v for k, v in task_figures(b).items() if k != "per_seed"} for s, b in subj.items()}
    return res


def meditron_results(spec: MeditronSpec, model: Path, runs: list[dict], not_run: dict[str, str]) -> dict:
    """results.json of the runs' item rows: per task and seed, per task over seeds, the average."""
    tasks = {t.name: _task_block(t, [r for r in runs if r["task"] == t.name])
             for t in MEDITRON if any(r["task"] == t.name for r in runs)}
    seeds = list(range(spec.seeds))
    per_seed_avg = [statistics.fmean(v["per_seed"][i]["correct"] / v["n"] for v in tasks.values()) for i in seeds]
    return {"schema": 1, "suite": "meditron", "limit": spec.limit, "n": sum(v["n"] for v in tasks.values()),
            "shots": spec.shots, "seeds": seeds, "cot": spec.cot, "samples": spec.samples,
            "metric": "accuracy of the extracted answer (an unparseable answer counts wrong)",
            "model": {"path": str(model.resolve()), "name": model.name, "sha256": sha256_file(model)},
            "protocol": {"prompt_format": PROMPT_FORMAT, "sampling": SAMPLING_DEFAULTS,
                         "max_tokens": runs[0]["plan"].max_tokens, "n_ctx": spec.n_ctx},
            "tasks": tasks, "not_run": not_run,
            "average": round(statistics.fmean(v["accuracy"] for v in tasks.values()), 6),
            "average_sd": round(statistics.stdev(per_seed_avg), 6) if len(seeds) > 1 else None,
            "average_over": list(tasks), "order": [t.name for t in MEDITRON],
            "columns": {t.name: t.column for t in MEDITRON}}


def summary_lines(res: dict) -> list[str]:
    """One line per task (mean over seeds, SD, interval, unparseable), then the average."""
    lines = []
    for col, v, why in suite_rows(res, "not_run"):
        if v is None:
            lines.append(f"{col:16s}     -  not run: {why}")
            continue
        lo, hi = v["accuracy_ci95"]
        sd = f"  SD {100 * v['accuracy_sd']:.1f}" if v["accuracy_sd"] is not None else ""
        lines.append(f"{col:16s} {v['n']:5d}  {100 * v['accuracy']:5.1f}%{sd}  [{100 * lo:.1f}, {100 * hi:.1f}]  "
                     f"unparseable {v['unparseable']} ({100 * v['unparseable_rate']:.1f}%)")
    sd = f"  SD {100 * res['average_sd']:.1f}" if res["average_sd"] is not None else ""
    lines.append(f"{'average':16s} {res['n']:5d}  {100 * res['average']:5.1f}%{sd}  "
                 f"(unweighted, {len(res['average_over'])} tasks; {res['shots']}-shot, {len(res['seeds'])} seeds)")
    return lines
