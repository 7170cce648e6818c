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


@click.command("sweep")
@click.argument("stage_dir", type=click.Path())
@click.option("--grid", "grids", multiple=True, help="KEY=V1,V2,... (Axolotl keys; repeat for more keys).")
@click.option("--optuna", "optuna_trials", type=int, default=None,
              help="Let Optuna (TPE, seeded) choose N trials from the grid's values instead of trying all.")
@click.option("--objective", default="loss", show_default=True,
              help='Expression over logged metrics to minimise, e.g. "eval_loss - 0.25*entailment".')
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(), default=None, help="Sweep artifact folder (default STAGE_DIR-sweep).")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def sweep_cmd(stage_dir, grids, optuna_trials, objective, seed, out, force, as_json):
    """Hyper-parameter sweep over a stage: each trial is a real `tools train` run of a derived stage.

    Trials live in OUT-trials/NN (stage folders of their own). The table of trials, a PNG of final
    loss vs learning rate per micro batch size, and the best trial go into OUT's manifest.

    \b
    Example:
      tools sweep runs/sft --grid learning_rate=1e-4,1e-3 --grid micro_batch_size=2,4
      tools sweep runs/sft --grid learning_rate=1e-5,1e-4,1e-3 --optuna 4 --objective "eval_loss"
    """
    from evals.sweep import Objective, grid_combos, parse_grid, plot_sweep, run_sweep
    from tools.artifact import Stage, read_artifact
    from tools.io import write_json

    obj = Objective(objective)  # bad objective: exit 2 before any training
    stage = read_artifact(stage_dir, stage="stage.")
    if not grids:
        raise UserError("give at least one --grid KEY=V1,V2", field="--grid")
    grid = parse_grid(grids)
    from recipes.recipe import check_keys
    check_keys(grid)
    combos = grid_combos(grid)
    out = Path(out) if out else Path(stage_dir).with_name(Path(stage_dir).name + "-sweep")
    params = {"grid": grid, "optuna": optuna_trials, "objective": objective, "seed": seed}
    trials = out.with_name(out.name + "-trials")  # each trial is a stage folder of its own
    with Stage("sweep", out, params, inputs=[stage.path], force=force) as st:
        if not st.skipped:
            def run_trial(i, overrides):
                return _derive_and_train(stage.path, trials / f"{i:02d}", overrides, force)
            rows = run_sweep(combos, run_trial, obj, optuna_trials, seed)
            best = min(rows, key=lambda r: r["objective"])
            write_json(st.path("trials.json"), rows)
            plot_sweep(rows, st.path("sweep.png"))
            md = ["| trial | " + " | ".join(grid) + " | final loss | objective |",
                  "|---|" + "---|" * len(grid) + "---|---|"]
            md += [f"| {r['trial']} | " + " | ".join(str(r["params"].get(k)) for k in grid)
                   + f" | {r['metrics'].get('loss', float('nan')):.4f} | {r['objective']:.4f} |" for r in rows]
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
