"""Validity: our llama.cpp log-likelihood scorer on an f16 GGUF agrees with lm-eval's `hf` model on
the checkpoint the GGUF was converted from, on the same PubMedQA prompts."""
from __future__ import annotations

import json

import pytest

N_ITEMS = 8


@pytest.mark.slow
@pytest.mark.native
def test_loglik_agrees_with_lm_eval_hf(smollm2_hf, smollm2_f16, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from evals.bench import run_bench
    from evals.items import load_items, question_block
    from evals.mmlu import task_manager
    from tools.io import sha256_bytes, write_jsonl

    gguf = smollm2_f16.path / smollm2_f16.extra["file"]   # llama.cpp's converter on smollm2_hf
    # the N shortest test items (the test's run time), in file order, as a data file both sides read
    items = load_items("pubmedqa", split="test")[0]
    keep = {it.id for it in sorted(items, key=lambda it: (len(question_block("pubmedqa", it)), it.id))[:N_ITEMS]}
    data = tmp_path / "pubmedqa-subset.jsonl"
    write_jsonl(data, [it.to_dict() for it in items if it.id in keep])

    art = run_bench("pubmedqa", model=gguf, data=data, mode="loglik", out=tmp_path / "ours", plots=False)
    ours = {r["id"]: r for r in map(json.loads, (art.path / "items.jsonl").read_text().splitlines())}
    assert len(ours) == N_ITEMS

    lm = HFLM(pretrained=str(smollm2_hf), device="cpu", dtype="float32", batch_size=4)
    res = simple_evaluate(model=lm, tasks=["medilora_pubmedqa"], task_manager=task_manager(metadata={"data": str(data)}),
                          log_samples=True, bootstrap_iters=0)
    samples = res["samples"]["medilora_pubmedqa"]
    assert len(samples) == N_ITEMS
    agree = correct_theirs = 0
    for s in samples:
        doc = s["doc"]
        mine = ours[doc["id"]]
        assert sha256_bytes(doc["prompt"]) == mine["prompt_sha256"]  # the very same prompt
        lls = [float(r[0]) for r in s["filtered_resps"]]
        theirs = doc["choices"][max(range(len(lls)), key=lambda i: lls[i])]
        agree += theirs == mine["pred"]
        correct_theirs += theirs == mine["gold"]
        # lm-eval moves the prompt's trailing "\n" into the continuation: a constant shift, so compare differences
        d_ours = mine["loglik"]["yes"] - mine["loglik"]["no"]
        d_theirs = lls[doc["choices"].index("yes")] - lls[doc["choices"].index("no")]
        assert d_ours == pytest.approx(d_theirs, abs=0.1), doc["id"]
    acc_ours = json.loads((art.path / "results.json").read_text())["accuracy"]
    acc_theirs = correct_theirs / N_ITEMS
    print(f"agreement {agree}/{N_ITEMS}, accuracy ours {acc_ours:.3f} lm-eval hf {acc_theirs:.3f}")
    assert agree / N_ITEMS >= 0.98
    assert abs(acc_ours - acc_theirs) <= 0.01 + 1e-9
    assert acc_theirs == pytest.approx(res["results"]["medilora_pubmedqa"]["acc,none"], abs=1e-9)
