"""A sweep's trials: a stage derived from the swept one (its overrides applied), trained, and evaluated
by the `--eval` verbs (a bench of the trial's model as an f16 GGUF, or `eval semantic` of a seq2seq
trial's answers). The `--eval` text is parsed by the bench / eval verbs' own options at the CLI edge
(evals/cli.py ``parse_eval``); this module gets the parsed ``EvalSpec``."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from recipes.seq2seq import CONFIG_FILE, predict
from recipes.stage import StageSpec, write_stage
from recipes.train import train_stage
from release.convert import convert_stage
from release.merge import merge_stage_dir
from tools.artifact import read_artifact
from tools.errors import UserError
from tools.progress import log
from tools.stages import STAGE, TRAIN

from .bench import BenchSpec, run_bench
from .semantic import evaluate, resolve_metric_model

EVAL_VERBS = {("bench", "pubmedqa"), ("bench", "medqa"), ("bench", "mcq"), ("eval", "semantic")}
SET_BY_SWEEP = ("--model", "--out", "--seq2seq", "--json", "--force")  # options the sweep sets for each trial


@dataclass(frozen=True)
class EvalSpec:
    """One parsed `--eval`: the verb (``kind`` ``task``) and its options as the verb's Click command parsed them."""

    text: str
    kind: str
    task: str
    params: dict

    def __str__(self) -> str:
        return self.text


def bench_metric_names(task: str, mode: str, plain: bool = True) -> set[str]:
    """What a trial's `bench TASK --mode MODE` evaluation exposes to the objective."""
    names = {"accuracy", "valid_rate", "macro_f1", "accuracy_norm" if mode == "loglik" else "accuracy_strict"}
    return {f"{task}_{m}" for m in names} | (names if plain else set())


def bench_figures(task: str, results: dict, plain: bool = True) -> dict[str, float]:
    out = {}
    for m in bench_metric_names(task, results.get("mode", "generate"), plain):
        key = m[len(task) + 1:] if m.startswith(task + "_") else m
        if isinstance(results.get(key), (int, float)):
            out[m] = float(results[key])
    return out


def final_metrics(history: list[dict]) -> dict[str, float]:
    """Last logged value of each metric in a trainer's log history."""
    out: dict[str, float] = {}
    for h in history:
        for k, v in h.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    if "eval_loss" in out:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50))
    if "loss" in out:
        out["perplexity"] = math.exp(min(out["loss"], 50))
    return out


def derive_and_train(stage_dir: Path, trial_dir: Path, overrides: dict, force: bool) -> dict:
    """Write a stage like STAGE_DIR but with ``overrides``, train it, return its final metrics."""
    p = read_artifact(stage_dir, stage=STAGE).params
    sets = {**(p.get("set") or {}), **overrides}
    write_stage(StageSpec.from_params(p, trial_dir, set_items=tuple(f"{k}={json.dumps(v)}" for k, v in sorted(sets.items())),
                                      force=force))
    trained = train_stage(trial_dir)
    hist = trained.extra.get("log_history") or []
    if not hist:
        raise UserError("trial logged nothing", path=str(trial_dir))
    return final_metrics(hist)


def stage_info(stage_dir: Path) -> tuple[bool, bool]:
    """(seq2seq?, has a validation split?) of a stage folder."""
    art = read_artifact(stage_dir, stage=STAGE)
    seq2seq = art.extra.get("arch") == "seq2seq"
    if seq2seq:
        cfg = json.loads((stage_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        return True, bool(cfg.get("val_set_size")) or any(
            (Path(d) / "validation.jsonl").is_file() for d in cfg.get("datasets", []) if isinstance(d, str))
    cfg = yaml.safe_load((stage_dir / "axolotl.yaml").read_text(encoding="utf-8")) or {}
    return False, bool(cfg.get("test_datasets")) or bool(cfg.get("val_set_size"))


class TrialEval:
    """One `--eval` spec, checked before any training: "bench TASK [bench options]" (the trial's model,
    merged if it is an adapter and converted to an f16 GGUF, benched with the bench verb's own options)
    or "eval semantic [semantic options]" (a seq2seq trial's answers on --data, scored)."""

    def __init__(self, spec: EvalSpec, seq2seq: bool, plain: bool):
        self.spec, self.kind, self.task, self.params = spec.text, spec.kind, spec.task, spec.params
        if self.kind == "eval":
            if not seq2seq:
                raise UserError("--eval 'eval semantic ...' scores a seq2seq trial's answers; for a causal model "
                                "use --eval 'bench TASK ...'", field="--eval")
            if not self.params.get("data"):
                raise UserError(f"--eval {spec!r}: give --data DATASET_DIR (the questions and reference answers)",
                                field="--eval")
            self.produces = set()
            self.missing = {}
            for metric, key, name in (("bertscore_f1", "bertscore_model", "bertscore_f1"),
                                      ("semscore", "semscore_model", "semscore"),
                                      ("nli_entailment", "nli_model", "entailment")):
                model_dir, _, note = resolve_metric_model(metric, self.params.get(key))
                if model_dir is None:
                    self.missing[name] = note
                else:
                    self.produces.add(name)
        else:
            if self.task == "mcq" and not self.params.get("data"):
                raise UserError(f"--eval {spec!r}: bench mcq needs --data FILE", field="--eval")
            self.plain = plain
            self.produces = bench_metric_names(self.task, self.params["mode"], plain)
            self.missing = {}

    def run(self, stage_dir: Path, trial_dir: Path, force: bool) -> dict[str, float]:
        out = trial_dir / "eval"
        trained = read_artifact(trial_dir / "output", stage=TRAIN)
        if self.kind == "eval":
            p = self.params
            pred = predict(trained.path, p["data"], out / "predictions", split=p["split"],
                           max_new_tokens=p["max_new_tokens"], limit=p["limit"], force=force)
            art = evaluate(out / "semantic", results=pred.path, bertscore_model=p["bertscore_model"],
                           semscore_model=p["semscore_model"], nli_model=p["nli_model"],
                           bertscore_layer=p["bertscore_layer"], batch_size=p["batch_size"], limit=p["limit"],
                           force=force)
            means = json.loads((art.path / "results.json").read_text(encoding="utf-8"))["metrics"]
            names = {"bertscore_f1": "bertscore_f1", "semscore": "semscore", "nli_entailment": "entailment"}
            return {names[m]: float(v["mean"]) for m, v in means.items() if m in names}
        model_dir = trained.path
        if trained.extra.get("adapter"):
            model_dir = merge_stage_dir(trial_dir, out / "merged", force=force).path
        # The trials are compared with each other on the same bench; the release fidelity gate (HF vs GGUF
        # next-token KL) runs when the chosen model is converted with `tools convert`, not per trial.
        gguf = convert_stage(model_dir, out / "gguf", "f16", force=force, fidelity_tokens=0)
        spec = replace(BenchSpec.from_options(self.task, self.params), model=str(gguf.path),
                       out=str(out / f"bench-{self.task}"), force=force, plots=False)
        log(f"trial {trial_dir.name}: {self.spec}")
        art = run_bench(spec)
        res = json.loads((art.path / "results.json").read_text(encoding="utf-8"))
        return bench_figures(self.task, res, self.plain)
