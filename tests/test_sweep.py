"""Issue 7: a grid sweep of real `tools train` runs (the grid is the product of its axes) picks the best trial; perplexity of the
model on its own training data falls after those few steps (base vs fine-tuned, one table)."""
from __future__ import annotations

import json

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
    r = tools_cli("sweep", stage, "--grid", "learning_rate=1e-3,3e-2", "--grid", "micro_batch_size=1",
                  "--objective", "loss", "--json", "--out", tmp_path / "sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    trials = res["trials"]
    assert len(trials) == 2
    assert sorted((t["params"]["learning_rate"], t["params"]["micro_batch_size"]) for t in trials) == \
        [(1e-3, 1), (3e-2, 1)]
    best = min(trials, key=lambda t: t["metrics"]["loss"])
    assert res["best"]["trial"] == best["trial"]
    man = read_artifact(tmp_path / "sweep")
    assert man.extra["best"]["params"] == best["params"] and man.extra["n_trials"] == 2
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for t in trials:  # each trial is a real, trained stage of its own
        out = read_artifact(tmp_path / "sweep-trials" / f"{t['trial']:02d}" / "output", stage="train")
        assert out.extra["log_history"] and out.extra["adapter"] is False

    # perplexity on its own training data falls after training (the best trial's model)
    best_out = tmp_path / "sweep-trials" / f"{best['trial']:02d}" / "output"
    p = tools_cli("eval", "perplexity", "--model", tiny_llama, "--model", best_out, "--data", data,
                  "--split", "test", "--json")
    assert p.returncode == 0, p.stderr
    base, tuned = json.loads(p.stdout)
    assert base["n_tokens"] == tuned["n_tokens"] > 0
    assert tuned["perplexity"] < 0.9 * base["perplexity"], (base, tuned)
