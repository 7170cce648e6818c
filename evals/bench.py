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

import json
import os
import random
import time
from dataclasses import dataclass, fields
from dataclasses import field as dc_field
from pathlib import Path

from tools.artifact import Artifact, SpecRule, Stage, is_artifact
from tools.errors import UserError
from tools.ggufpath import resolve_gguf
from tools.io import sha256_bytes, sha256_file, write_json, write_jsonl
from tools.llm import SAMPLING_DEFAULTS, LlamaRunner, item_seed
from tools.paths import embedded_gguf
from tools.progress import log, progress

from . import extract
from .items import Item, answer_text, load_items, question_block, system_prompt, user_message
from .mcq import load_mcq, parse_map
from .rag import Retriever, fit_context
from .render import render_bench_report
from .stats import bootstrap_macro_f1, wilson

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
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in params.items() if k in names and k != "task"}
        kw["sampling"] = {k: params.get(k) for k in cls.SAMPLING_OPTIONS}
        if params.get("maps"):
            kw["field_map"] = parse_map(params["maps"])
        if params.get("answer_base") is not None:  # mcq: how to read integer answers (evals.mcq.load_mcq)
            kw["field_map"] = {**(kw.get("field_map") or {}), "answer_base": [str(params["answer_base"])]}
        return cls(task=task, **kw)


def run_bench(task: str | BenchSpec, **kw) -> Artifact:
    """Run one bench: ``run_bench(spec)`` or ``run_bench(task, **BenchSpec fields)``: plan, run the items
    (resuming after the last finished one), then write ``results(plan, rows, run)``."""
    spec = task if isinstance(task, BenchSpec) else BenchSpec(task=task, **kw)
    plan = plan_bench(spec)
    with Stage(f"bench.{spec.task}", plan.out, plan.params, inputs=plan.inputs, force=spec.force, log=log,
               spec_rule=SPEC_RULE) as st:
        if st.skipped:
            return st.result
        scratch = scratch_path(plan.out, st.fingerprint)
        rows, run = run_items(plan, scratch)
        res = results(plan, rows, run)
        write_json(st.path("results.json"), res)
        write_jsonl(st.path("items.jsonl"), rows)
        render_bench_report(res, rows, st.path("report.md").parent, plots=spec.plots)
        st.lineage.licenses.add("MIT")
        st.lineage.sources.add(f"{spec.task} ({plan.data_path.name})")
        st.extra.update({"accuracy": res["accuracy"], "valid_rate": res["valid_rate"], "n": res["n"],
                         "accuracy_ci95": res["accuracy_ci95"], "resumed_from_item": run.resumed or None,
                         "timing": run.timing(res["n"])})
    scratch.unlink(missing_ok=True)
    return st.result


# parameters added after the first runs: at these values they are left out of the fingerprint (old runs keep theirs)
SPEC_RULE = SpecRule(defaults={"shots": 0, "cot": False, "samples": 1, "map": None, "lora": None})


@dataclass
class ShotPlan:
    """The few-shot examples of a run (none when ``k`` is 0) and the ChatML turns they become."""

    k: int = 0
    items: list[Item] = dc_field(default_factory=list)
    dev_path: Path | None = None
    excluded: int = 0
    turns: list[dict] = dc_field(default_factory=list)


@dataclass
class BenchPlan:
    """A checked spec with everything resolved that does not need the model loaded: items, paths, shots,
    sampling, the output folder, the fingerprinted parameters and inputs."""

    spec: BenchSpec
    flavor: str
    items: list[Item]
    labels: list[str]
    data_path: Path
    model_path: Path
    lora_path: Path | None
    max_tokens: int
    sampling: dict
    rag_dir: Path | None
    shots: ShotPlan
    out: Path
    params: dict
    inputs: list[Path]


@dataclass
class RunFacts:
    """What running the items measured (model side), for results and the manifest's timing."""

    resumed: int = 0
    wall: float = 0.0
    load: float = 0.0
    evaluated: int = 0
    threads: int | None = None
    n_gpu_layers: int | None = None
    template: str | None = None

    def timing(self, n: int) -> dict:
        done = n - self.resumed
        return {"wall_s": round(self.wall, 3), "load_s": round(self.load, 3),
                "items_per_s": round(done / self.wall, 4) if self.wall and done > 0 else None,
                "s_per_item": round(self.wall / max(1, done), 4), "evaluated_tokens": self.evaluated,
                "threads": self.threads}


def check_spec(spec: BenchSpec) -> None:
    """The checks of the options that need no file read (one UserError naming the option)."""
    if spec.mode not in ("generate", "loglik"):
        raise UserError(f"unknown mode {spec.mode!r} (generate or loglik)", field="--mode")
    for value, flag, low in ((spec.limit, "--limit", 1), (spec.max_tokens, "--max-tokens", 1), (spec.k, "--k", 1),
                             (spec.samples, "--samples", 1)):
        if value is not None and value < low:
            raise UserError("must be at least 1", field=flag)
    if spec.shots < 0:
        raise UserError("must be 0 or more", field="--shots")
    if spec.mode == "loglik" and (spec.cot or spec.samples > 1):
        raise UserError("--cot and --samples draw answers: use them with --mode generate",
                        field="--cot" if spec.cot else "--samples")
    if spec.task == "mcq" and not spec.data:
        raise UserError("tools bench mcq needs --data FILE.jsonl", field="--data")
    if spec.task != "mcq" and spec.field_map:
        raise UserError("--map is for tools bench mcq", field="--map")
    if spec.rag and not Path(spec.rag).is_dir():
        raise UserError("RAG index folder not found", path=str(spec.rag), field="--rag")


def _load(spec: BenchSpec, data, split: str, limit: int | None = None):
    """(items, path, flavor): the bench data (``spec.data``, ``spec.split``) or the few-shot pool (``spec.dev``,
    "dev"); a task's own file when ``data`` is None."""
    if spec.task == "mcq":
        return load_mcq(data, spec.field_map, limit)
    items, path = load_items(spec.task, data, split, limit)
    return items, path, spec.task


def plan_shots(spec: BenchSpec, flavor: str, data_path: Path) -> ShotPlan:
    """Pick the few-shot examples from the dev pool (never a test item) and render them as turns."""
    if not spec.shots:
        return ShotPlan()
    if spec.dev is None and spec.task == "mcq":
        raise UserError("--shots with tools bench mcq needs --dev FILE.jsonl (the examples' split)", field="--dev")
    if spec.dev is None and not spec.data and spec.split == "dev":
        raise UserError("--shots takes its examples from the dev split: bench the test split (or give --dev)",
                        field="--shots")
    pool, dev_path, dflav = _load(spec, spec.dev, "dev")
    if dflav != flavor:
        raise UserError(f"the --dev file is a {dflav} set, the bench data a {flavor} set", path=str(dev_path),
                        field="--dev")
    if dev_path.resolve() == data_path.resolve():
        raise UserError("--shots examples must come from another file than the items benched", path=str(dev_path),
                        field="--dev")
    picked, excluded = pick_shots(pool, spec.shots, spec.seed, flavor, _load(spec, spec.data, spec.split)[0],
                                   spec.task)
    if excluded:
        log(f"few-shot: {excluded} dev examples left out of the pool because they are test items")
    long_answers = _long_answers(dev_path) if spec.cot and flavor == "pubmedqa" else {}
    return ShotPlan(spec.shots, picked, dev_path, excluded, shot_turns(flavor, picked, spec.cot, long_answers))


def _sampling(spec: BenchSpec) -> dict:
    samp = {**SAMPLING_DEFAULTS, **{k: v for k, v in (spec.sampling or {}).items() if v is not None}}
    unknown = set(samp) - set(SAMPLING_DEFAULTS)
    if unknown:
        raise UserError(f"unknown sampling parameter {sorted(unknown)[0]!r}", field="sampling")
    return samp


def plan_bench(spec: BenchSpec) -> BenchPlan:
    """Check the spec and resolve everything a run needs before loading the model."""
    check_spec(spec)
    model_path = resolve_gguf(spec.model, "--model") if spec.model else embedded_gguf()
    lora_path = resolve_gguf(spec.lora, "--lora") if spec.lora else None
    items, data_path, flavor = _load(spec, spec.data, spec.split, spec.limit)
    shots = plan_shots(spec, flavor, data_path)
    samp = _sampling(spec)
    rag_dir = Path(spec.rag) if spec.rag else None
    if spec.out:
        out = Path(spec.out)
    elif spec.task == "mcq":
        out = Path("runs") / "bench" / f"mcq-{data_path.stem}-{spec.mode}-{model_path.stem}"
    else:
        out = default_out(spec.task, spec.mode, model_path, spec.split)
    gen = spec.mode == "generate"
    max_tokens = spec.max_tokens or (256 if spec.cot else 16)
    params = {"task": spec.task, "mode": spec.mode, "split": spec.split if not spec.data else "custom",
              "limit": spec.limit, "seed": spec.seed, "max_tokens": max_tokens if gen else None,
              "full_answer": spec.full_answer if gen else None, "sampling": samp if gen else None,
              "n_ctx": spec.n_ctx, "prompt_format": PROMPT_FORMAT,
              "rag": {"index": str(rag_dir), "k": spec.k} if rag_dir else None,
              "shots": spec.shots, "cot": spec.cot, "samples": spec.samples, "map": spec.field_map or None,
              "lora": lora_path.name if lora_path else None}  # a LoRA adapter GGUF applied by llama.cpp
    inputs = [model_path, data_path] + ([shots.dev_path] if shots.dev_path else []) + \
        ([lora_path] if lora_path else []) + ([rag_dir] if rag_dir and is_artifact(rag_dir) else [])
    return BenchPlan(spec, flavor, items, _labels(flavor, items), data_path, model_path, lora_path, max_tokens,
                     samp, rag_dir, shots, out, params, inputs)


def _resume(scratch: Path, items: list[Item]) -> list[dict]:
    """The finished rows of an earlier, unfinished run of the same fingerprint (the scratch file rewritten
    without a torn last line)."""
    rows = _read_scratch(scratch, items)
    with open(scratch, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    if rows and len(rows) < len(items):
        log(f"resuming: {len(rows)} of {len(items)} items already done ({scratch}); continuing from item "
            f"{len(rows) + 1} (id {items[len(rows)].id})")
    elif rows:
        log(f"resuming: all {len(items)} items already done ({scratch}); writing the results")
    return rows


def run_items(plan: BenchPlan, scratch: Path, lr: LlamaRunner | None = None,
              label: str | None = None) -> tuple[list[dict], RunFacts]:
    """Run the items not yet in ``scratch`` (each appended and flushed there as it finishes); the rows as
    they read back from JSON, and what the run measured. ``lr``: a model already loaded (the meditron
    suite runs many plans on one; ``label`` names each in the progress line); by default the plan's
    model is loaded here."""
    if lr is None:
        t0 = time.perf_counter()
        with LlamaRunner(plan.model_path, n_ctx=plan.spec.n_ctx, n_threads=plan.spec.threads,
                         n_batch=plan.spec.n_batch, seed=plan.spec.seed, n_gpu_layers=plan.spec.n_gpu_layers,
                         lora_path=plan.lora_path) as own:
            load = time.perf_counter() - t0
            rows, run = run_items(plan, scratch, own, label)
        run.load = load
        return rows, run
    spec, items = plan.spec, plan.items
    rows = _resume(scratch, items)
    run = RunFacts(resumed=len(rows))
    with open(scratch, "a", encoding="utf-8") as sf:
        runner = ItemRunner(plan, lr, Retriever(plan.rag_dir) if plan.rag_dir else None)
        lr.evaluated_tokens = 0
        t1 = time.perf_counter()
        try:
            with progress(label or f"{spec.task} {spec.mode}", total=len(items), unit="items") as advance:
                advance(run.resumed)
                for it in items[run.resumed:]:
                    row = runner.run(it)
                    sf.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                    sf.flush()
                    rows.append(row)
                    advance(1)
        except KeyboardInterrupt:
            log(f"interrupted after {len(rows)} of {len(items)} items ({len(rows) - run.resumed} in this run); "
                f"they are saved in {scratch}. Run the same command again to continue from item {len(rows) + 1}.")
            raise
        run.wall = time.perf_counter() - t1
        run.evaluated, run.threads, run.n_gpu_layers = lr.evaluated_tokens, lr.n_threads, lr.n_gpu_layers
        run.template = lr.template_source
    return [json.loads(json.dumps(r, ensure_ascii=False, sort_keys=True)) for r in rows], run


# ---- results: a pure function of the item rows --------------------------------------------------

def _mode_metrics(plan: BenchPlan, rows: list[dict]) -> tuple[list, dict]:
    """(predictions, the mode's own figures): loglik's length-normalised accuracy, generate's strict/lenient."""
    gold, n = [r["gold"] for r in rows], len(rows)
    if plan.spec.mode == "loglik":
        n_norm = sum(r["correct_norm"] for r in rows)
        return [r["pred"] for r in rows], {
            "accuracy_norm": round(n_norm / n, 6), "accuracy_norm_ci95": wilson(n_norm, n), "valid_rate": 1.0,
            "valid_rates": {"strict": 1.0, "lenient": 1.0}, "valid_rate_ci95": wilson(n, n)}
    preds = [r["parsed"] for r in rows]
    strict_pred = [r["parsed"] if r["strict"] else None for r in rows]
    n_valid = sum(p is not None for p in preds)
    return preds, {"accuracy_strict": round(sum(g == p for g, p in zip(gold, strict_pred)) / n, 6),
                   "valid_rate": round(n_valid / n, 6), "valid_rate_ci95": wilson(n_valid, n),
                   "valid_rates": {"strict": round(sum(p is not None for p in strict_pred) / n, 6),
                                   "lenient": round(n_valid / n, 6)}}


def self_consistency(rows: list[dict], samples: int) -> dict | None:
    """Ties, unanimous items and the valid share of all samples of a ``--samples N`` run (None for one sample)."""
    if samples < 2:
        return None
    all_samples = [s for r in rows for s in r["samples"]]
    return {"samples": samples, "ties": sum(bool(r["tie"]) for r in rows), "tie_rule": "earliest sample's label",
            "unanimous": sum(len(r["votes"]) == 1 and max(r["votes"].values()) == samples for r in rows),
            "valid_sample_rate": round(sum(s["parsed"] is not None for s in all_samples) / len(all_samples), 6)}


def _shots_block(plan: BenchPlan, rows: list[dict], fewer: int) -> dict | None:
    sh = plan.shots
    if not sh.k:
        return None
    return {"k": sh.k, "ids": [s.id for s in sh.items], "stratified": plan.flavor == "pubmedqa",
            "source": {"path": str(sh.dev_path.resolve()), "sha256": sha256_file(sh.dev_path)},
            "excluded_as_test_items": sh.excluded, "items_with_fewer_shots": fewer,
            "min_shots_used": min((r.get("shots", sh.k) for r in rows), default=sh.k)}


def results(plan: BenchPlan, rows: list[dict], run: RunFacts) -> dict:
    """The results document (schema 1, see the module docstring) of the item rows: same rows, same document."""
    spec, n, gen = plan.spec, len(rows), plan.spec.mode == "generate"
    gold = [r["gold"] for r in rows]
    preds, mode_m = _mode_metrics(plan, rows)
    ci = {"accuracy_ci95": wilson(sum(bool(r["correct"]) for r in rows), n),
          "macro_f1_ci95": bootstrap_macro_f1(plan.labels, gold, preds, seed=spec.seed),
          "intervals": {"level": 0.95, "proportions": "wilson",
                        "macro_f1": f"bootstrap percentile over items, 1000 resamples, seed {spec.seed}"}}
    sc = self_consistency(rows, spec.samples)
    if sc and sc["ties"]:
        log(f"self-consistency: {sc['ties']} of {n} items had a tied vote (earliest sample's label taken)")
    fewer = sum(1 for r in rows if spec.shots and r.get("shots", spec.shots) < spec.shots)
    if fewer:
        log(f"few-shot: {fewer} of {n} items got fewer than {spec.shots} shots to fit n_ctx {spec.n_ctx} "
            "(shots are dropped, the question is never cut)")
    systems = sorted({system_prompt(plan.flavor, it.options) for it in plan.items})
    res = {"schema": 1, "task": spec.task, "mode": spec.mode, "split": plan.params["split"], "n": n, "seed": spec.seed,
           "model": {"path": str(plan.model_path.resolve()), "name": plan.model_path.name,
                     "sha256": sha256_file(plan.model_path)},
           "data": {"path": str(plan.data_path.resolve()), "sha256": sha256_file(plan.data_path)},
           **classification_metrics(plan.labels, gold, preds), **mode_m, **ci,
           "sampling": plan.sampling if gen else None, "max_tokens": plan.max_tokens if gen else None,
           "full_answer": spec.full_answer if gen else None, "n_ctx": spec.n_ctx, "n_gpu_layers": run.n_gpu_layers,
           "prompt": {"template": run.template, "format": PROMPT_FORMAT,
                      "system_sha256": [sha256_bytes(s) for s in systems]},
           "tokens": {"prompt_total": sum(r["prompt_tokens"] for r in rows),
                      "prompt_mean": round(sum(r["prompt_tokens"] for r in rows) / n, 3),
                      "generated_total": sum(r.get("gen_tokens", 0) for r in rows)},
           "rag": plan.params["rag"]}
    if spec.task == "mcq":
        res.update({"flavor": plan.flavor, "map": spec.field_map or None})
    if spec.shots or spec.cot or spec.samples > 1:
        res.update({"cot": spec.cot, "samples": spec.samples, "self_consistency": sc,
                    "shots": _shots_block(plan, rows, fewer)})
    return res


# ---- one item --------------------------------------------------------------------------------------

class ItemRunner:
    """Runs one item at a time on a loaded model: the prompt (system, shots that fit, RAG context, the
    question), then log-likelihood scoring or generation (one draw, or N with a majority vote)."""

    def __init__(self, plan: BenchPlan, lr, retriever=None):
        self.plan, self.spec, self.lr, self.retriever = plan, plan.spec, lr, retriever
        self.prefixes: dict[tuple, list[int]] = {}

    def run(self, it: Item) -> dict:
        row: dict = {"id": it.id, "gold": it.answer}
        prompt = self.prompt(it, row)
        row["prompt_sha256"] = sha256_bytes(prompt)
        if self.spec.mode == "loglik":
            return self.loglik(it, prompt, row)
        return self.generate(it, prompt, row)

    def _room(self, it: Item) -> int:
        """Tokens the answer needs after the prompt."""
        if self.spec.mode == "generate":
            return self.plan.max_tokens
        return max(self.lr.count_tokens(answer_text(self.plan.flavor, lab, it)) for lab in it.options)

    def prompt(self, it: Item, row: dict) -> str:
        """The rendered prompt (its prefix set in the KV cache); ``row`` gets the RAG chunks and shots used."""
        lr, flavor, opts = self.lr, self.plan.flavor, list(it.options)
        system, room, rag_text = system_prompt(flavor, it.options), self._room(it), ""
        if self.retriever is not None:
            chunks = self.retriever.search(it.question, self.spec.k)
            rag_text, kept = fit_context(system, question_block(flavor, it), chunks, lr.count_tokens, lr.n_ctx,
                                         room + 24)
            row["chunks"] = [{"id": c.get("id"), "score": round(float(c.get("score", 0.0)), 6)} for c in kept]
        user = user_message(flavor, it, rag_text)
        if self.spec.cot:
            user += "\n\n" + extract.cot_instruction(flavor, opts)
        k = self.spec.shots
        while True:  # the prompt must leave room for the answer: drop shots (the last first), never cut the question
            head = [{"role": "system", "content": system}, *self.plan.shots.turns[: 2 * k]]
            prompt = lr.render_messages([*head, {"role": "user", "content": user}])
            fits = len(lr.tokenize(prompt)) + room + 1 <= lr.n_ctx
            if fits or k == 0:
                break
            k -= 1
        if self.spec.shots and not fits:
            raise UserError(f"item {it.id}: the question alone needs {len(lr.tokenize(prompt))} prompt tokens + "
                            f"{room} for the answer, more than n_ctx {lr.n_ctx} (questions are never cut)",
                            field="--n-ctx")
        if self.spec.shots:
            row["shots"] = k
        if (system, k) not in self.prefixes:
            self.prefixes[(system, k)] = lr.prefix_for_messages(head)
        lr.set_prefix(self.prefixes[(system, k)])
        return prompt

    def loglik(self, it: Item, prompt: str, row: dict) -> dict:
        flavor, opts = self.plan.flavor, list(it.options)
        conts, ptoks = [], None
        for lab in opts:
            ptoks, cont = self.lr.split_continuation(prompt, answer_text(flavor, lab, it))
            conts.append(cont)
        scores = self.lr.score(ptoks, conts)
        ll = {lab: round(s[0], 6) for lab, s in zip(opts, scores)}
        norm = {lab: s[0] / max(1, len(answer_text(flavor, lab, it).encode("utf-8"))) for lab, s in zip(opts, scores)}
        pred = max(opts, key=lambda lab: (ll[lab], -opts.index(lab)))
        pred_norm = max(opts, key=lambda lab: (norm[lab], -opts.index(lab)))
        row.update({"prompt_tokens": len(ptoks), "loglik": ll, "pred": pred, "pred_norm": pred_norm,
                    "correct": pred == it.answer, "correct_norm": pred_norm == it.answer})
        return row

    def parse(self, it: Item, text: str, final: bool):
        if self.spec.cot:
            return extract.parse_cot(self.plan.flavor, text, list(it.options), final=final)
        return extract.parse(self.plan.flavor, text, list(it.options), final=final)

    def generate(self, it: Item, prompt: str, row: dict) -> dict:
        spec, ptoks = self.spec, self.lr.tokenize(prompt)
        kw = {"max_tokens": self.plan.max_tokens, "sampling": self.plan.sampling,
              "decided": None if spec.full_answer else (lambda text: self.parse(it, text, False).decided)}
        row["prompt_tokens"] = len(ptoks)
        if spec.samples == 1:
            text, ng, reason = self.lr.generate(ptoks, seed=item_seed(spec.seed, it.id), **kw)
            p = self.parse(it, text, True)
            row.update({"raw": text, "parsed": p.label, "strict": p.strict, "finish": reason, "gen_tokens": ng,
                        "correct": p.label == it.answer})
            return row
        seeds = [item_seed(spec.seed, f"{it.id}#{j}") for j in range(spec.samples)]
        parsed = [(t, ng, r, self.parse(it, t, True)) for t, ng, r in self.lr.generate_samples(ptoks, seeds, **kw)]
        winner, votes, tie = majority([p.label for *_, p in parsed])
        lead = next((d for d in parsed if d[3].label == winner), parsed[0])
        row.update({"raw": lead[0], "parsed": winner,
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
