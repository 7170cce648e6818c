"""`tools sweep STAGE_DIR`: grid or Optuna search where every trial is a real training run."""
from __future__ import annotations

import json
from pathlib import Path

import click

from tools.errors import UserError


def _derive_and_train(stage_dir: Path, trial_dir: Path, overrides: dict, force: bool) -> dict:
    """Write a stage like STAGE_DIR but with ``overrides``, train it, return its final metrics."""
    from evals.sweep import final_metrics
    from recipes.stage import write_stage
    from recipes.train import train_stage
    from tools.artifact import read_artifact

    p = read_artifact(stage_dir, stage="stage.").params
    preset = p.get("preset") or {}
    sets = {**(p.get("set") or {}), **overrides}
    write_stage(p["kind"], trial_dir, base_model=None if p.get("from") else p["base_model"], data=p["data"],
                from_stage=p.get("from"), merged=p.get("merged"), device=preset.get("device"),
                gpus=preset.get("gpus"), nodes=preset.get("nodes"), shard=preset.get("shard"),
                mode=p.get("mode"), options=p.get("options") or {},
                set_items=[f"{k}={json.dumps(v)}" for k, v in sorted(sets.items())], force=force)
    trained = train_stage(trial_dir)
    hist = trained.extra.get("log_history") or []
    if not hist:
        raise UserError("trial logged nothing", path=str(trial_dir))
    return final_metrics(hist)


def _stage_info(stage_dir: Path) -> tuple[bool, bool]:
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
        from evals.bench import run_bench
        from evals.cli import bench_kwargs
        from evals.mcq import parse_map
        from evals.sweep import bench_figures
        from release.convert import convert_stage

        model_dir = trained.path
        if trained.extra.get("adapter"):
            from release.merge import merge_stage_dir
            model_dir = merge_stage_dir(trial_dir, out / "merged", force=force).path
        # The trials are compared with each other on the same bench; the release fidelity gate (HF vs GGUF
        # next-token KL) runs when the chosen model is converted with `tools convert`, not per trial.
        import inspect
        gate_off = {"fidelity_tokens": 0} if "fidelity_tokens" in inspect.signature(convert_stage).parameters else {}
        gguf = convert_stage(model_dir, out / "gguf", "f16", force=force, **gate_off)
        kw = bench_kwargs(**{**self.params, "model": str(gguf.path), "out": str(out / f"bench-{self.task}"),
                             "force": force, "field_map": parse_map(self.params.get("maps"))})
        log(f"trial {trial_dir.name}: {self.spec}")
        art = run_bench(self.task, plots=False, **kw)
        res = json.loads((art.path / "results.json").read_text(encoding="utf-8"))
        return bench_figures(self.task, res, self.plain)


@click.command("sweep")
@click.argument("stage_dir", type=click.Path())
@click.option("--grid", "grids", multiple=True, help="KEY=V1,V2,... (Axolotl keys; repeat for more keys).")
@click.option("--optuna", "optuna_trials", type=int, default=None,
              help="Let Optuna (TPE, seeded) choose N trials from the grid's values instead of trying all.")
@click.option("--objective", default="loss", show_default=True,
              help='Expression over logged metrics to minimise, e.g. "eval_loss - 0.25*entailment".')
@click.option("--eval", "evals", multiple=True,
              help="Evaluate every trial's model with a verb and expose its figures to the objective: "
                   "\"bench pubmedqa --mode loglik --split dev --limit 20\" (accuracy, macro_f1, valid_rate, ...) "
                   "or \"eval semantic --data D --split validation\" for seq2seq trials (entailment, ...).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(), default=None, help="Sweep artifact folder (default STAGE_DIR-sweep).")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def sweep_cmd(stage_dir, grids, optuna_trials, objective, evals, seed, out, force, as_json):
    """Hyper-parameter sweep over a stage: each trial is a real `tools train` run of a derived stage.

    Trials live in OUT-trials/NN (stage folders of their own). The table of trials, a PNG of final
    loss vs learning rate per micro batch size, and the best trial go into OUT's manifest.

    \b
    Example:
      tools sweep runs/sft --grid learning_rate=1e-4,1e-3 --grid micro_batch_size=2,4
      tools sweep runs/sft --grid learning_rate=1e-5,1e-4,1e-3 --optuna 4 --objective "eval_loss"
      tools sweep runs/sft --grid learning_rate=1e-4,1e-3 --objective "eval_loss - accuracy" \\
        --eval "bench pubmedqa --mode loglik --split dev --limit 20"
    """
    from evals.sweep import (
        EVAL_LOSS_METRICS,
        SEMANTIC_METRICS,
        TRAINER_METRICS,
        Objective,
        check_produced,
        grid_combos,
        parse_grid,
        plot_sweep,
        run_sweep,
    )
    from tools.artifact import Stage, read_artifact
    from tools.io import write_json

    obj = Objective(objective)  # bad objective: exit 2 before any training
    stage = read_artifact(stage_dir, stage="stage.")
    seq2seq, has_val = _stage_info(stage.path)
    n_bench = sum(1 for e in evals if "bench" in e.split()[:2])
    plans = [TrialEval(e, seq2seq, plain=n_bench == 1) for e in evals]
    produced = set(TRAINER_METRICS) | (EVAL_LOSS_METRICS if has_val else set())
    hints = {m: "the stage has no validation split (add validation.jsonl to the dataset, or val_set_size)"
             for m in EVAL_LOSS_METRICS}
    hints.update({m: "no --eval produces it (add --eval \"eval semantic ...\" on a seq2seq stage)"
                  for m in SEMANTIC_METRICS})
    for p in plans:
        produced |= p.produces
        hints.update({m: f"--eval {p.spec!r} cannot compute it here: {why}" for m, why in p.missing.items()})
    for m in obj.names - produced:
        if m not in hints:
            hints[m] = "no --eval produces it (add --eval \"bench TASK ...\")"
    check_produced(obj, produced, hints)  # before the first trial
    if not grids:
        raise UserError("give at least one --grid KEY=V1,V2", field="--grid")
    grid = parse_grid(grids)
    from recipes.recipe import check_keys
    check_keys(grid)
    combos = grid_combos(grid)
    out = Path(out) if out else Path(stage_dir).with_name(Path(stage_dir).name + "-sweep")
    params = {"grid": grid, "optuna": optuna_trials, "objective": objective, "seed": seed,
              **({"eval": list(evals)} if evals else {})}
    trials = out.with_name(out.name + "-trials")  # each trial is a stage folder of its own
    with Stage("sweep", out, params, inputs=[stage.path], force=force) as st:
        if not st.skipped:
            def run_trial(i, overrides):
                m = _derive_and_train(stage.path, trials / f"{i:02d}", overrides, force)
                for p in plans:
                    m.update(p.run(stage.path, trials / f"{i:02d}", force))
                return m
            rows = run_sweep(combos, run_trial, obj, optuna_trials, seed)
            best = min(rows, key=lambda r: r["objective"])
            write_json(st.path("trials.json"), rows)
            plot_sweep(rows, st.path("sweep.png"))
            shown = sorted(obj.names - {"loss"})  # the objective's other terms (eval_loss, accuracy, ...)
            md = ["| trial | " + " | ".join([*grid, "final loss", *shown]) + " | objective |",
                  "|---|" + "---|" * (len(grid) + len(shown)) + "---|---|"]
            md += [f"| {r['trial']} | " + " | ".join(str(r["params"].get(k)) for k in grid)
                   + f" | {r['metrics'].get('loss', float('nan')):.4f} | "
                   + "".join(f"{r['metrics'].get(m, float('nan')):.4f} | " for m in shown)
                   + f"{r['objective']:.4f} |" for r in rows]
            if evals:
                md += ["", "Each trial's model was also evaluated: " + "; ".join(f"`{e}`" for e in evals)
                       + " (files in OUT-trials/NN/eval)."]
            st.path("report.md").write_text("# Sweep\n\nObjective: `" + objective + "` (lower is better)\n\n"
                                            + "\n".join(md) + f"\n\nBest: trial {best['trial']} {best['params']}\n\n"
                                            "![final loss vs learning rate](sweep.png)\n")
            st.extra["best"] = {"trial": best["trial"], "params": best["params"], "objective": best["objective"],
                                "stage": str(trials / f"{best['trial']:02d}")}
            st.extra["n_trials"] = len(rows)
    res = read_artifact(out)
    rows = json.loads((out / "trials.json").read_text())
    if as_json:
        click.echo(json.dumps({"best": res.extra["best"], "trials": rows}, indent=2, sort_keys=True))
    else:
        from rich.table import Table

        from tools.progress import out as console
        t = Table(title=f"Sweep of {stage_dir} ({len(rows)} trials, objective {objective})")
        for c in ["trial", *grid, "final loss", "objective"]:
            t.add_column(c)
        for r in rows:
            t.add_row(str(r["trial"]), *[str(r["params"].get(k)) for k in grid],
                      f"{r['metrics'].get('loss', float('nan')):.4f}", f"{r['objective']:.4f}")
        console.print(t)
        click.echo(f"best: trial {res.extra['best']['trial']} {res.extra['best']['params']}  ({out})")
