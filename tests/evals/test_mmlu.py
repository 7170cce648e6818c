"""tools eval mmlu-medical: lm-eval's task machinery over the bundled CSVs, GGUF and HF backends."""
from __future__ import annotations

import json

import pytest

from tools.errors import UserError


def test_local_tasks_are_indexed_and_read_the_bundled_csvs():
    from evals.lm_eval_tasks.utils import load_mmlu
    from evals.mmlu import SUBJECTS, task_manager
    tm = task_manager()
    for s in SUBJECTS:
        assert f"mmlu_medical_{s}" in tm.all_tasks
    assert "medilora_pubmedqa" in tm.all_tasks
    ds = load_mmlu("anatomy")
    assert len(ds["test"]) == 135 and len(ds["dev"]) == 5
    assert ds["test"][0]["choices"][0] == "paralysis of the facial muscles." and ds["test"][0]["answer"] == 0


def test_bad_csv_names_file_and_line(tmp_path):
    from evals.lm_eval_tasks.utils import mmlu_csv
    f = tmp_path / "anatomy_test.csv"
    f.write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d\n")
    with pytest.raises(UserError, match=r"anatomy_test.csv:2: expected 6 columns"):
        mmlu_csv(f, "anatomy")
    f.write_text("Q1,a,b,c,d,F\n")
    with pytest.raises(UserError, match=r"anatomy_test.csv:1 \[answer\]"):
        mmlu_csv(f, "anatomy")


@pytest.mark.native
def test_gguf_backend_scores_like_the_bench_scorer(tools_cli, tmp_path, smollm2_gguf):
    """`tools eval mmlu-medical` on the GGUF: per-subject table and averages; the registered lm-eval
    model's choice equals the argmax of our scorer's log-likelihoods over " A".." D"."""
    out = tmp_path / "mmlu"
    p = tools_cli("eval", "mmlu-medical", "--subjects", "anatomy,virology", "--limit", "4", "--threads", "1",
                  "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert res["task"] == "mmlu-medical" and res["n"] == 8 and res["shots"] == 0
    assert set(res["subjects"]) == {"anatomy", "virology"} and all(v["n"] == 4 for v in res["subjects"].values())
    acc = {s: v["accuracy"] for s, v in res["subjects"].items()}
    assert res["accuracy_macro"] == pytest.approx(sum(acc.values()) / 2, abs=1e-6)
    assert (out / "subjects.png").is_file() and "| anatomy | 4 |" in (out / "report.md").read_text()

    # recompute anatomy's 4 answers with the scorer directly, on lm-eval's prompt
    from evals.lm_eval_tasks.utils import load_mmlu
    from tools.llm import LlamaRunner
    docs = load_mmlu("anatomy")["test"]
    head = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    right = 0
    with LlamaRunner(smollm2_gguf, n_ctx=2048, n_threads=1) as lr:
        for d in list(docs)[:4]:
            ctx = head + d["question"].strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", d["choices"])) + "\nAnswer:"
            pairs = [lr.split_continuation(ctx, f" {L}") for L in "ABCD"]
            scores = [s for s, _ in lr.score(pairs[0][0], [c for _, c in pairs])]
            right += max(range(4), key=lambda i: scores[i]) == d["answer"]
    assert res["subjects"]["anatomy"]["accuracy"] == pytest.approx(right / 4, abs=1e-6)


def test_five_shot_and_hf_backend(tmp_path, tiny_llama, monkeypatch):
    """An HF folder runs through lm-eval's hf model; 5-shot prompts carry the five dev exemplars
    (checked in the contexts lm-eval hands the model, not in the parameters we echo)."""
    import csv

    from lm_eval.models.huggingface import HFLM

    from evals.mmlu import MmluSpec, run_mmlu
    from tools.paths import bundled_data

    contexts: list[str] = []
    orig = HFLM.loglikelihood

    def recording(self, requests, *a, **k):
        contexts.extend(r.args[0] for r in requests)
        return orig(self, requests, *a, **k)
    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    art = run_mmlu(MmluSpec(model=tiny_llama, shots=5, subjects=("medical_genetics",), limit=2), tmp_path / "hf")
    res = json.loads((art.path / "results.json").read_text())
    assert res["shots"] == 5 and res["n"] == 2 and res["model"]["backend"] == "lm-eval hf"
    assert 0.0 <= res["accuracy"] <= 1.0 and art.stage == "eval.mmlu-medical"
    with open(bundled_data() / "mmlu_medical" / "dev" / "medical_genetics_dev.csv", newline="") as f:
        dev = [row[0] for row in csv.reader(f)]
    assert len(dev) == 5 and len(contexts) == 2 * 4  # 2 questions x 4 options
    for ctx in contexts:
        assert all(q in ctx for q in dev), "a 5-shot prompt lacks a dev exemplar"
        assert ctx.count("Answer:") == 6  # five answered exemplars + the question


def test_bad_model_exit_2(tools_cli, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    p = tools_cli("eval", "mmlu-medical", "--model", d, "--out", tmp_path / "o")
    assert p.returncode == 2 and "no config.json" in p.stderr and not (tmp_path / "o").exists()
    p = tools_cli("eval", "mmlu-medical", "--subjects", "astrology", "--out", tmp_path / "o")
    assert p.returncode == 2 and "unknown subject" in p.stderr
