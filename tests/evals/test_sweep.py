"""A grid sweep (the grid is the product of its axes) runs every combination as a trial and keeps the one with the
lowest objective (trials that train nothing); one real trial runs through `tools sweep` end to end (a derived stage
trained by Axolotl, benched, the objective over both); perplexity of the model on its own training data falls after
those few steps (base vs fine-tuned, one table)."""
from __future__ import annotations

import json
import math

import pytest

from tools.artifact import Stage, read_artifact


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


def test_grid_sweep_tries_every_combination_and_keeps_the_lowest_objective(tmp_path, monkeypatch):
    """`tools sweep`'s own function over a 2 x 2 grid, with trials that train nothing: every combination once,
    in grid order, each in its trial folder; the objective computed from each trial's metrics; the lowest one
    kept (here neither the first nor the last trial); trials.json, report.md and sweep.png written."""
    import evals.sweep as S

    with Stage("stage", tmp_path / "stage", {"kind": "sft"}) as st:
        st.path("axolotl.yaml").write_text("base_model: x\nval_set_size: 0.25\n")  # eval_loss: a validation split
    ran = []

    def fake_trial(stage_dir, trial_dir, overrides, force):
        ran.append((trial_dir.name, overrides))
        lr, mb = overrides["learning_rate"], overrides["micro_batch_size"]
        return {"loss": abs(math.log10(lr) + 1.5) + 0.1 * mb, "eval_loss": 1 + 0.1 * mb}
    monkeypatch.setattr(S, "derive_and_train", fake_trial)
    checked = []  # the grid's keys go through recipes.recipe.check_keys (Axolotl's schema: tests/recipes)
    monkeypatch.setattr(S, "check_keys", checked.append)
    art = S.sweep_stage(tmp_path / "stage", grids=("learning_rate=1e-3,3e-2", "micro_batch_size=1,2"),
                        objective="loss + 0.5*eval_loss", out=tmp_path / "sweep")
    assert ran == [(f"{i:02d}", {"learning_rate": lr, "micro_batch_size": mb})
                   for i, (lr, mb) in enumerate([(1e-3, 1), (1e-3, 2), (3e-2, 1), (3e-2, 2)])]
    assert checked == [{"learning_rate": [1e-3, 3e-2], "micro_batch_size": [1, 2]}]
    rows = json.loads((art.path / "trials.json").read_text())
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["objective"] == pytest.approx(r["metrics"]["loss"] + 0.5 * r["metrics"]["eval_loss"])
    assert art.extra["n_trials"] == 4 and art.extra["best"] == {
        "trial": 2, "params": {"learning_rate": 3e-2, "micro_batch_size": 1}, "objective": rows[2]["objective"],
        "stage": str(tmp_path / "sweep-trials" / "02")}
    report = (art.path / "report.md").read_text()
    assert "Best: trial 2" in report and "eval_loss" in report and report.count("\n| ") == 5  # header + 4 trials
    assert (art.path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sweep_runs_a_real_trial_and_perplexity_falls(tiny_llama, tmp_path, tools_cli):
    """One real trial through `tools sweep` (Axolotl's training, the trial's model converted and benched,
    the objective over both); every combination of a grid runs the same way (above, without training)."""
    data = _sft_dataset(tmp_path)
    stage = tmp_path / "stage"
    r = tools_cli("stage", "sft", "--base-model", tiny_llama, "--dataset", data, "--device", "cpu", "--full",
                  "--max-steps", "3", "--seq-len", "256", "--warmup-steps", "0", "--grad-accum", "1", "--no-packing",
                  "--set", "logging_steps=1", "--set", "save_steps=3",  # one checkpoint, at the end
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
    r = tools_cli("sweep", stage, "--grid", "learning_rate=3e-2", "--grid", "micro_batch_size=1",
                  "--objective", "eval_loss - accuracy", "--json", "--out", tmp_path / "sweep",
                  "--eval", "bench pubmedqa --mode loglik --split dev --limit 3 --threads 1 --n-ctx 2048")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    [t] = res["results"]
    assert t["trial"] == 0 and t["params"] == {"learning_rate": 3e-2, "micro_batch_size": 1}
    m = t["metrics"]  # the objective combined the trainer's eval_loss with the trial's own bench figure
    assert 0 <= m["accuracy"] <= 1 and m["pubmedqa_accuracy"] == m["accuracy"] and "eval_loss" in m
    assert t["objective"] == pytest.approx(m["eval_loss"] - m["accuracy"])
    trial = tmp_path / "sweep-trials" / "00"
    bench = json.loads((trial / "eval" / "bench-pubmedqa" / "results.json").read_text())
    assert bench["n"] == 3 and bench["split"] == "dev" and bench["accuracy"] == m["accuracy"]
    man = read_artifact(tmp_path / "sweep")
    assert man.extra["best"]["trial"] == res["manifest"]["extra"]["best"]["trial"] == 0 and man.extra["n_trials"] == 1
    assert "accuracy" in (tmp_path / "sweep" / "report.md").read_text()
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # the trial is a real, trained stage of its own, with the trial's learning rate
    out = read_artifact(trial / "output", stage="train")
    assert out.extra["log_history"] and out.extra["adapter"] is False
    assert read_artifact(trial).params["set"]["learning_rate"] == 3e-2

    # perplexity on its own training data falls after training (the trial's model)
    p = tools_cli("eval", "perplexity", "--model", tiny_llama, "--model", trial / "output", "--data", data,
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
