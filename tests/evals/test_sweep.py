"""A grid sweep of real `tools train` runs (the grid is the product of its axes) picks the best trial; perplexity of the
model on its own training data falls after those few steps (base vs fine-tuned, one table)."""
from __future__ import annotations

import json
import math

import pytest

from tools.artifact import Stage, read_artifact

pytestmark = pytest.mark.slow


def _sft_dataset(path, n=12):
    """Short ChatML rows (question -> label and the start of the long answer) from PubMedQA dev."""
    from tools.paths import bundled_data
    rows = []
    for line in (bundled_data() / "pubmedqa" / "dev.jsonl").read_text().splitlines()[:n]:
        d = json.loads(line)
        rows.append(json.dumps({"id": d["id"], "meta": {}, "messages": [
            {"role": "system", "content": "Answer yes, no or maybe."},
            {"role": "user", "content": d["QUESTION"]},
            {"role": "assistant", "content": f"{d['final_decision']}. {d['LONG_ANSWER'][:80]}"}]}))
    with Stage("dataset.pubmedqa", path / "small", {"n": n}) as st:
        st.path("train.jsonl").write_text("\n".join(rows) + "\n")
        st.path("test.jsonl").write_text("\n".join(rows) + "\n")  # its own training data, on purpose
        st.path("validation.jsonl").write_text("\n".join(rows[:4]) + "\n")  # for eval_loss
    return st.result.path


def test_grid_is_the_product_of_its_axes():
    from evals.sweep import grid_combos, parse_grid

    grid = parse_grid(("learning_rate=1e-3,3e-2", "micro_batch_size=1,2"))
    assert grid == {"learning_rate": [1e-3, 3e-2], "micro_batch_size": [1, 2]}
    assert sorted((c["learning_rate"], c["micro_batch_size"]) for c in grid_combos(grid)) == \
        [(1e-3, 1), (1e-3, 2), (3e-2, 1), (3e-2, 2)]


def test_grid_sweep_runs_real_trials_and_perplexity_falls(tiny_llama, tmp_path, tools_cli):
    """Two real Axolotl trials (each ~50 s of CPU on 2 cores: the product itself is checked above)."""
    data = _sft_dataset(tmp_path)
    stage = tmp_path / "stage"
    r = tools_cli("stage", "sft", "--base-model", tiny_llama, "--dataset", data, "--device", "cpu", "--full",
                  "--max-steps", "3", "--seq-len", "256", "--warmup-steps", "0", "--grad-accum", "1", "--no-packing",
                  "--set", "logging_steps=1",
                  "--set", f"dataset_prepared_path={tmp_path / 'prepared'}", "--out", stage)
    assert r.returncode == 0, r.stderr
    bad = tools_cli("sweep", stage, "--grid", "learning_rate=1e-3", "--objective", "eval_loss - 0.25*entailmnt")
    assert bad.returncode == 2 and "unknown metric 'entailmnt'" in bad.stderr
    # an objective naming a figure no trial will produce is refused before any training
    for objective, evals, msg in [
            ("eval_loss - 0.25*entailment", [], "needs 'entailment' but no --eval produces it"),
            ("eval_loss - accuracy", [], "needs 'accuracy' but no --eval produces it"),
            ("eval_loss - 0.25*entailment", ["--eval", "eval semantic --data x"], "scores a seq2seq trial"),
            ("eval_loss - accuracy_norm", ["--eval", "bench pubmedqa --mode generate"], "needs 'accuracy_norm'"),
            ("loss", ["--eval", "bench pubmedqa --bogus 1"], "No such option"),
            ("loss", ["--eval", "bench pubmedqa --model m.gguf"], "--model is set by the sweep")]:
        bad = tools_cli("sweep", stage, "--grid", "learning_rate=1e-3", "--objective", objective, *evals,
                        "--out", tmp_path / "refused")
        assert bad.returncode == 2 and msg in bad.stderr, (objective, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused-trials").exists()
    r = tools_cli("sweep", stage, "--grid", "learning_rate=1e-3,3e-2", "--grid", "micro_batch_size=1",
                  "--objective", "eval_loss - accuracy", "--json", "--out", tmp_path / "sweep",
                  "--eval", "bench pubmedqa --mode loglik --split dev --limit 3 --threads 1 --n-ctx 2048")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    trials = res["results"]
    assert len(trials) == 2
    assert sorted((t["params"]["learning_rate"], t["params"]["micro_batch_size"]) for t in trials) == \
        [(1e-3, 1), (3e-2, 1)]
    for t in trials:  # the objective combined the trainer's eval_loss with the trial's own bench figure
        m = t["metrics"]
        assert 0 <= m["accuracy"] <= 1 and m["pubmedqa_accuracy"] == m["accuracy"] and "eval_loss" in m
        assert t["objective"] == pytest.approx(m["eval_loss"] - m["accuracy"])
        bench = json.loads((tmp_path / "sweep-trials" / f"{t['trial']:02d}" / "eval" / "bench-pubmedqa" /
                            "results.json").read_text())
        assert bench["n"] == 3 and bench["split"] == "dev" and bench["accuracy"] == m["accuracy"]
    assert res["manifest"]["extra"]["best"]["trial"] == min(trials, key=lambda t: t["objective"])["trial"]
    best = min(trials, key=lambda t: t["metrics"]["loss"])
    man = read_artifact(tmp_path / "sweep")
    assert man.extra["best"]["trial"] == res["manifest"]["extra"]["best"]["trial"] and man.extra["n_trials"] == 2
    assert "accuracy" in (tmp_path / "sweep" / "report.md").read_text()
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for t in trials:  # each trial is a real, trained stage of its own
        out = read_artifact(tmp_path / "sweep-trials" / f"{t['trial']:02d}" / "output", stage="train")
        assert out.extra["log_history"] and out.extra["adapter"] is False

    # perplexity on its own training data falls after training (the best trial's model)
    best_out = tmp_path / "sweep-trials" / f"{best['trial']:02d}" / "output"
    p = tools_cli("eval", "perplexity", "--model", tiny_llama, "--model", best_out, "--data", data,
                  "--split", "test", "--json")
    assert p.returncode == 0, p.stderr
    base, tuned = json.loads(p.stdout)["results"]
    assert base["n_tokens"] == tuned["n_tokens"] > 0
    assert tuned["perplexity"] < 0.9 * base["perplexity"], (base, tuned)


def test_optuna_picks_distinct_trials_from_the_grid_and_finds_the_minimum():
    """`--optuna N` through real Optuna (TPE, seeded), with a trial that trains nothing: N distinct combinations
    from the grid's values (a repeated suggestion is not run again), the same ones for the same seed, and an
    objective over a bowl finds its bottom once the grid is covered."""
    from evals.sweep import Objective, grid_combos, parse_grid, run_sweep

    grid = parse_grid(("learning_rate=1e-4,1e-3,1e-2", "micro_batch_size=1,2"))
    combos = grid_combos(grid)

    def sweep(n, seed):
        ran = []

        def run_trial(i, params):
            assert i == len(ran)
            ran.append(params)
            lr, mb = params["learning_rate"], params["micro_batch_size"]
            return {"loss": abs(math.log10(lr) + 3) + 0.1 * mb}  # lowest at lr 1e-3, micro batch 1
        rows = run_sweep(combos, run_trial, Objective("loss"), optuna_trials=n, seed=seed)
        return ran, rows

    ran, rows = sweep(4, seed=0)
    keys = [tuple(sorted(p.items())) for p in ran]
    assert len(ran) == len(rows) == 4 and len(set(keys)) == 4  # 4 trainings, all different
    assert all(p in combos for p in ran)
    assert [r["params"] for r in rows] == ran and [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert all(r["objective"] == r["metrics"]["loss"] for r in rows)
    assert sweep(4, seed=0)[0] == ran  # seeded: the same trials again
    ran, rows = sweep(10, seed=1)  # more trials than combinations: each combination once, then it stops
    assert sorted(map(lambda p: tuple(sorted(p.items())), ran)) == sorted(tuple(sorted(c.items())) for c in combos)
    assert min(rows, key=lambda r: r["objective"])["params"] == {"learning_rate": 1e-3, "micro_batch_size": 1}
