"""Hyper-parameter sweeps: every trial is a real `tools train` run of a derived stage.

A trial copies the stage's Axolotl config, applies the trial's overrides, writes it as its own
stage folder (``OUT/trials/NN``, validated by Axolotl's schema like any stage) and trains it with
the same code as `tools train`. Grid sweeps try every combination; ``--optuna N`` lets Optuna's
TPE sampler (seeded) pick N distinct trials from the same value lists (a combination it
suggests again is not trained twice). The objective is an arithmetic
expression over the logged metrics of a trial (``eval_loss``, ``loss``, ...) and over the figures of
the trial's own evaluation (``--eval``: a bench of the trial's model converted to GGUF, or `eval
semantic` of a seq2seq trial), e.g. LoRAG's ``eval_loss - 0.25*entailment`` or
``eval_loss - accuracy``; lower is better. An objective naming a metric no trial will produce is
refused before the first trial.
"""
from __future__ import annotations

import ast
import itertools
import math
import operator
from pathlib import Path
from typing import Any, Callable

import yaml

from recipes.recipe import check_keys
from tools.artifact import Stage, read_artifact
from tools.errors import UserError
from tools.io import write_json
from tools.plotting import pyplot, save_png
from tools.stages import STAGE

from .trials import TrialEval, bench_figures, bench_metric_names, derive_and_train, final_metrics, stage_info  # noqa: F401

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}
_UN = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"log": math.log, "exp": math.exp, "sqrt": math.sqrt, "abs": abs, "min": min, "max": max}

# Metrics a trial can report: what the HF trainer logs, and the semantic metrics of `tools eval semantic`.
TRAINER_METRICS = {"loss", "train_loss", "perplexity", "grad_norm", "learning_rate", "epoch", "train_runtime",
                   "train_samples_per_second"}
EVAL_LOSS_METRICS = {"eval_loss", "eval_perplexity"}  # only when the stage has a validation split
SEMANTIC_METRICS = {"entailment", "bertscore_f1", "semscore"}
# `--eval "bench TASK ..."`: a trial's bench figures, as `accuracy` and as `TASK_accuracy`
BENCH_TASKS = ("pubmedqa", "medqa", "mcq")
BENCH_METRICS = {"accuracy", "valid_rate", "macro_f1", "accuracy_norm", "accuracy_strict"}
KNOWN_METRICS = (TRAINER_METRICS | EVAL_LOSS_METRICS | SEMANTIC_METRICS | BENCH_METRICS
                 | {f"{t}_{m}" for t in BENCH_TASKS for m in BENCH_METRICS})


class Objective:
    """A safe arithmetic expression over metric names (no attribute access, no calls but math)."""

    def __init__(self, expr: str, known: set[str] = KNOWN_METRICS):
        self.expr = expr
        try:
            self.tree = ast.parse(expr, mode="eval")
        except SyntaxError as e:
            raise UserError(f"objective is not an arithmetic expression ({e.msg})", field="--objective") from None
        self.names = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name) and node.id not in _FUNCS:
                self.names.add(node.id)
            elif isinstance(node, ast.Call):
                if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
                    raise UserError(f"objective may call only {', '.join(sorted(_FUNCS))}", field="--objective")
            elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load,
                                       ast.Call, *_BIN, *_UN)):
                raise UserError(f"objective holds a {type(node).__name__}, not allowed", field="--objective")
        unknown = sorted(self.names - known)
        if unknown:
            raise UserError(f"unknown metric {unknown[0]!r} in objective (known: {', '.join(sorted(known))})",
                            field="--objective")

    def __call__(self, metrics: dict[str, float]) -> float:
        missing = sorted(self.names - set(metrics))
        if missing:
            raise UserError(f"trial logged no {missing[0]!r} (it logged: {', '.join(sorted(metrics))})",
                            field="--objective")

        def ev(n):
            if isinstance(n, ast.Expression):
                return ev(n.body)
            if isinstance(n, ast.Constant):
                return float(n.value)
            if isinstance(n, ast.Name):
                return float(metrics[n.id])
            if isinstance(n, ast.BinOp):
                return _BIN[type(n.op)](ev(n.left), ev(n.right))
            if isinstance(n, ast.UnaryOp):
                return _UN[type(n.op)](ev(n.operand))
            if isinstance(n, ast.Call):
                return _FUNCS[n.func.id](*[ev(a) for a in n.args])
            raise UserError(f"unsupported {type(n).__name__}", field="--objective")
        return float(ev(self.tree))


def _scalar(v: str):
    """A grid value: int, then float (YAML 1.1 reads "1e-3" as a string), then YAML."""
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return yaml.safe_load(v)


def parse_grid(specs: tuple[str, ...]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"grid entry {spec!r} is not KEY=V1,V2,...", field="--grid")
        key, vals = spec.split("=", 1)
        values = [_scalar(v.strip()) for v in vals.split(",") if v.strip()]
        if not key.strip() or not values:
            raise UserError(f"grid entry {spec!r} is not KEY=V1,V2,...", field="--grid")
        grid[key.strip()] = values
    return grid


def check_produced(objective: Objective, produced: set[str], hints: dict[str, str]) -> None:
    """Refuse (before any training) an objective naming a metric no trial will produce."""
    missing = sorted(objective.names - produced)
    if missing:
        m = missing[0]
        why = hints.get(m) or "no trial produces it"
        raise UserError(f"objective needs {m!r} but {why} (trials will produce: {', '.join(sorted(produced))})",
                        field="--objective")


def run_sweep(combos: list[dict], run_trial: Callable[[int, dict], dict], objective: Objective,
              optuna_trials: int | None = None, seed: int = 0) -> list[dict]:
    """Run trials (grid order, or chosen by Optuna) and return their rows with the objective."""
    rows: list[dict] = []
    if optuna_trials:
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        keys = sorted({k for c in combos for k in c})
        space = {k: sorted({repr(c[k]) for c in combos}) for k in keys}
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))

        done: dict[tuple, float] = {}  # TPE may suggest a combination again: it is not trained twice

        def fn(trial):
            picked = tuple(trial.suggest_categorical(k, space[k]) for k in keys)
            if picked in done:
                return done[picked]
            params = {k: ast.literal_eval(v) for k, v in zip(keys, picked)}
            m = run_trial(len(rows), params)
            val = objective(m)
            rows.append({"trial": len(rows), "params": params, "metrics": m, "objective": val})
            done[picked] = val
            return val
        # N distinct trials at most: a grid smaller than N is simply tried whole
        n_distinct = math.prod(len(v) for v in space.values())
        study.optimize(fn, n_trials=50 * optuna_trials,  # repeats cost nothing; the callback stops it
                       callbacks=[lambda s, t: s.stop() if len(rows) >= min(optuna_trials, n_distinct) else None])
    else:
        for i, params in enumerate(combos):
            m = run_trial(i, params)
            rows.append({"trial": i, "params": params, "metrics": m, "objective": objective(m)})
    return rows


def grid_combos(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def plot_sweep(rows: list[dict], out_png: str | Path, x: str = "learning_rate", series: str = "micro_batch_size",
               metric: str = "loss") -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    groups: dict[Any, list] = {}
    for r in rows:
        if x in r["params"] and metric in r["metrics"]:
            groups.setdefault(r["params"].get(series, "-"), []).append((float(r["params"][x]), r["metrics"][metric]))
    for g, pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{series}={g}")
    ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"final {metric} vs {x}")
    if groups:
        ax.legend()
    fig.tight_layout()
    save_png(fig, out_png)


def sweep_stage(stage_dir: str | Path, *, grids: tuple[str, ...] = (), optuna_trials: int | None = None,
                objective: str = "loss", evals: tuple = (), seed: int = 0, out: str | Path | None = None,
                force: bool = False):
    """`tools sweep`: artifact ``sweep`` (trials.json, sweep.png, report.md); trials in OUT-trials/NN.

    Everything that can be refused (the objective, a metric nobody produces, the grid's keys, the
    --eval verbs' options) is refused before the first trial."""
    obj = Objective(objective)  # bad objective: exit 2 before any training
    stage = read_artifact(stage_dir, stage=STAGE)
    seq2seq, has_val = stage_info(stage.path)
    n_bench = sum(1 for e in evals if e.kind == "bench")
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
    check_keys(grid)
    combos = grid_combos(grid)
    out = Path(out) if out else Path(stage_dir).with_name(Path(stage_dir).name + "-sweep")
    params = {"grid": grid, "optuna": optuna_trials, "objective": objective, "seed": seed,
              **({"eval": [e.text for e in evals]} if evals else {})}
    trials = out.with_name(out.name + "-trials")  # each trial is a stage folder of its own
    with Stage("sweep", out, params, inputs=[stage.path], force=force) as st:
        if st.skipped:
            return st.result

        def run_trial(i, overrides):
            m = derive_and_train(stage.path, trials / f"{i:02d}", overrides, force)
            for p in plans:
                m.update(p.run(stage.path, trials / f"{i:02d}", force))
            return m
        rows = run_sweep(combos, run_trial, obj, optuna_trials, seed)
        best = min(rows, key=lambda r: r["objective"])
        write_json(st.path("trials.json"), rows)
        plot_sweep(rows, st.path("sweep.png"))
        st.path("report.md").write_text(_report(rows, grid, obj, objective, evals, best))
        st.extra["best"] = {"trial": best["trial"], "params": best["params"], "objective": best["objective"],
                            "stage": str(trials / f"{best['trial']:02d}")}
        st.extra["n_trials"] = len(rows)
    return st.result


def _report(rows: list[dict], grid: dict, obj: Objective, objective: str, evals, best: dict) -> str:
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
    return ("# Sweep\n\nObjective: `" + objective + "` (lower is better)\n\n" + "\n".join(md)
            + f"\n\nBest: trial {best['trial']} {best['params']}\n\n![final loss vs learning rate](sweep.png)\n")


def trials_table(rows: list[dict], grid: dict, title: str):
    """The rich Table `tools sweep` prints: one row a trial."""
    from rich.table import Table

    t = Table(title=title)
    for c in ["trial", *grid, "final loss", "objective"]:
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["trial"]), *[str(r["params"].get(k)) for k in grid],
                  f"{r['metrics'].get('loss', float('nan')):.4f}", f"{r['objective']:.4f}")
    return t
