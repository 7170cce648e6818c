"""A sweep's trials: a stage derived from the swept one (its overrides applied), trained, and evaluated
by the `--eval` verbs (a bench of the trial's model as an f16 GGUF, or `eval semantic` of a seq2seq
trial's answers)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from tools.errors import UserError


def derive_and_train(stage_dir: Path, trial_dir: Path, overrides: dict, force: bool) -> dict:
    """Write a stage like STAGE_DIR but with ``overrides``, train it, return its final metrics."""
    from evals.sweep import final_metrics
    from recipes.stage import StageSpec, write_stage
    from recipes.train import train_stage
    from tools.artifact import read_artifact

    p = read_artifact(stage_dir, stage="stage.").params
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
    import yaml

    from tools.artifact import read_artifact

    art = read_artifact(stage_dir, stage="stage.")
    seq2seq = art.extra.get("arch") == "seq2seq"
    if seq2seq:
        from recipes.seq2seq import CONFIG_FILE
        cfg = json.loads((stage_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        return True, bool(cfg.get("val_set_size")) or any(
            (Path(d) / "validation.jsonl").is_file() for d in cfg.get("datasets", []) if isinstance(d, str))
    cfg = yaml.safe_load((stage_dir / "axolotl.yaml").read_text(encoding="utf-8")) or {}
    return False, bool(cfg.get("test_datasets")) or bool(cfg.get("val_set_size"))


class TrialEval:
    """One `--eval` spec, checked before any training: "bench TASK [bench options]" (the trial's model,
    merged if it is an adapter and converted to an f16 GGUF, benched with the bench verb's own options)
    or "eval semantic [semantic options]" (a seq2seq trial's answers on --data, scored)."""

    def __init__(self, spec: str, seq2seq: bool, plain: bool):
        import shlex

        from tools.cli import cli, group

        self.spec = spec
        toks = shlex.split(spec)
        if len(toks) >= 2 and toks[0] == "tools":
            toks = toks[1:]
        if len(toks) < 2 or (toks[0], toks[1]) not in {("bench", t) for t in ("pubmedqa", "medqa", "mcq")} | \
                {("eval", "semantic")}:
            raise UserError(f"--eval {spec!r}: expected 'bench pubmedqa|medqa|mcq OPTIONS' or 'eval semantic OPTIONS'",
                            field="--eval")
        self.kind, self.task = toks[0], toks[1]
        for bad in ("--model", "--out", "--seq2seq", "--json", "--force"):
            if bad in toks:
                raise UserError(f"--eval {spec!r}: {bad} is set by the sweep for each trial", field="--eval")
        cmd = group(self.kind).get_command(click.Context(cli), self.task)
        try:
            self.params = cmd.make_context(f"{self.kind} {self.task}", list(toks[2:]), resilient_parsing=False).params
        except click.ClickException as e:
            raise UserError(f"--eval {spec!r}: {e.format_message()}", field="--eval") from None
        if self.kind == "eval":
            if not seq2seq:
                raise UserError("--eval 'eval semantic ...' scores a seq2seq trial's answers; for a causal model "
                                "use --eval 'bench TASK ...'", field="--eval")
            if not self.params.get("data"):
                raise UserError(f"--eval {spec!r}: give --data DATASET_DIR (the questions and reference answers)",
                                field="--eval")
            from evals.semantic import resolve_metric_model
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
            from evals.sweep import bench_metric_names
            if self.task == "mcq" and not self.params.get("data"):
                raise UserError(f"--eval {spec!r}: bench mcq needs --data FILE", field="--eval")
            self.plain = plain
            self.produces = bench_metric_names(self.task, self.params["mode"], plain)
            self.missing = {}

    def run(self, stage_dir: Path, trial_dir: Path, force: bool) -> dict[str, float]:
        from tools.artifact import read_artifact
        from tools.progress import log

        out = trial_dir / "eval"
        trained = read_artifact(trial_dir / "output", stage="train")
        if self.kind == "eval":
            from evals.semantic import evaluate
            from recipes.seq2seq import predict
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
        from dataclasses import replace

        from evals.bench import BenchSpec, run_bench
        from evals.sweep import bench_figures
        from release.convert import Gate, convert_stage

        model_dir = trained.path
        if trained.extra.get("adapter"):
            from release.merge import merge_stage_dir
            model_dir = merge_stage_dir(trial_dir, out / "merged", force=force).path
        # The trials are compared with each other on the same bench; the release fidelity gate (HF vs GGUF
        # next-token KL) runs when the chosen model is converted with `tools convert`, not per trial.
        gguf = convert_stage(model_dir, out / "gguf", "f16", force=force, gate=Gate(tokens=0))
        spec = replace(BenchSpec.from_options(self.task, self.params), model=str(gguf.path),
                       out=str(out / f"bench-{self.task}"), force=force, plots=False)
        log(f"trial {trial_dir.name}: {self.spec}")
        art = run_bench(spec)
        res = json.loads((art.path / "results.json").read_text(encoding="utf-8"))
        return bench_figures(self.task, res, self.plain)
