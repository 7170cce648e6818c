"""`tools train --select-by`: every checkpoint scored on dev items, the best one kept, merge uses it.

The tiny Llama trains 4 steps with a checkpoint at each. The test snapshots the checkpoints as the
selector receives them and recomputes each one's dev accuracy apart from evals.select (the bench's
prompt rendering, one uncached forward pass per option). The choice must be the argmax of those
accuracies (earliest on ties), every item's prompt the bench's own (same sha256), output/ must hold
the chosen adapter byte for byte, and `tools merge STAGE` must read output/ (its plan; the merge
itself is tested in tests/release). (Not through the GGUF: this tiny sentencepiece tokenizer is split
differently by llama.cpp, 25 tokens more a prompt, which flips near-tied options; HF vs GGUF
agreement is tested on SmolLM2 in test_bench_validity.py.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import make_dataset, pubmedqa_rows
from tools.artifact import read_artifact
from tools.errors import UserError
from tools.io import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
CPU_FAST = ["--device", "cpu", "--lora", "--max-steps", str(STEPS), "--micro-batch", "2", "--grad-accum", "1",
            "--no-packing", "--warmup-steps", "0", "--lr", "2e-2",
            "--set", "optimizer=adamw_torch", "--set", "save_steps=1"]


def _dev_items(path: Path, n: int = 24, start: int = 100) -> Path:
    """Normalized PubMedQA dev items the stage does not train on (a `bench mcq` file)."""
    write_jsonl(path, [{"id": d["id"], "question": d["QUESTION"], "context": d["CONTEXTS"][:1],
                        "options": ["yes", "no", "maybe"], "answer": d["final_decision"]}
                       for d in pubmedqa_rows(n, start)])
    return path


def _recompute(tiny_llama: Path, ckpt: Path, items: Path) -> tuple[float, dict]:
    """The checkpoint's accuracy computed here, apart from evals.select: the prompt rendered the way
    the bench renders it (llama-cpp-python's Jinja2 formatter over the model's chat template), each
    option scored by one full forward pass over prompt + option (no cache), argmax first on ties."""
    import torch
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.items import answer_text, system_prompt, user_message
    from evals.mcq import load_mcq
    from tools.io import sha256_bytes

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    fmt = Jinja2ChatFormatter(template=tok.chat_template, eos_token=tok.eos_token, bos_token=tok.bos_token,
                              add_generation_prompt=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32),
                                      str(ckpt)).eval()
    rows = {}
    for it in load_mcq(items, None, 20)[0]:
        prompt = fmt(messages=[{"role": "system", "content": system_prompt("pubmedqa", it.options)},
                               {"role": "user", "content": user_message("pubmedqa", it)}]).prompt
        n = len(tok(prompt)["input_ids"])
        ll = {}
        for lab in it.options:
            ids = tok(prompt + answer_text("pubmedqa", lab, it))["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            ll[lab] = sum(float(logp[j - 1, ids[j]]) for j in range(n, len(ids)))
        pred = max(it.options, key=lambda lab: (ll[lab], -list(it.options).index(lab)))
        rows[it.id] = {"pred": pred, "correct": pred == it.answer, "prompt_sha256": sha256_bytes(prompt), "ll": ll}
    return sum(r["correct"] for r in rows.values()) / len(rows), rows


def test_select_by_refuses_test_items_and_leaves_out_trained_ones(tmp_path):
    """Fast: the item rules, before any training (a file with one PubMedQA test item is refused; the
    items a stage trains on are left out of the N, and counted)."""
    from evals.select import parse_select_by, selector, trained_prompts

    items = _dev_items(tmp_path / "dev-items.jsonl")
    test_row = json.loads((Path(__file__).parents[2] / "evals/data/pubmedqa/test.jsonl").read_text().splitlines()[0])
    leaky = tmp_path / "leaky.jsonl"
    write_jsonl(leaky, [*map(json.loads, items.read_text().splitlines()),
                        {"id": test_row["id"], "question": test_row["QUESTION"], "options": ["yes", "no", "maybe"],
                         "answer": test_row["final_decision"]}])
    with pytest.raises(UserError, match="benchmark test item") as e:
        selector(f"{leaky}:100")
    assert str(e.value).startswith(str(leaky))
    for bad in ("pubmedqa-test:5", "medqa-test", "pubmedqa-dev:0", "nope.jsonl:3"):
        with pytest.raises(UserError):
            parse_select_by(bad)
    dataset = make_dataset(tmp_path / "dataset", n=16)  # the first 16 dev items
    got, left = parse_select_by("pubmedqa-dev:5").load(trained_prompts([dataset / "train.jsonl"]))
    assert left == 16 and [it.id for it in got] == [d["id"] for d in pubmedqa_rows(5, 16)]
    got, left = parse_select_by("pubmedqa-dev:5").load()
    assert left == 0 and [it.id for it in got] == [d["id"] for d in pubmedqa_rows(5)]


@pytest.mark.slow
def test_select_by_keeps_best_dev_checkpoint_and_merge_uses_it(tmp_path, tiny_llama, tools_cli):
    from evals.select import selector
    from recipes.train import train_stage

    dataset = make_dataset(tmp_path / "dataset", n=16)
    items = _dev_items(tmp_path / "dev-items.jsonl")
    s = tmp_path / "s"
    r = tools_cli("stage", "sft", "--base-model", tiny_llama, "--dataset", dataset, "--out", s, *CPU_FAST)
    assert r.returncode == 0, r.stderr

    # refused before any training: test items, by task name and inside a file (exit 2, one line)
    r = tools_cli("train", s, "--select-by", "pubmedqa-test:5")
    assert r.returncode == 2 and "dev split" in r.stderr and not (s / "checkpoints").exists(), r.stderr
    # the plan keeps every checkpoint (the stage's own save_total_limit would rotate them away)
    r = tools_cli("train", s, "--dry-run", "--select-by", f"{items}:20")
    assert r.returncode == 0 and "--save-total-limit=100000" in r.stdout, r.stderr

    saved = tmp_path / "saved"
    real = selector(f"{items}:20")

    def snapshot(checkpoints, base_model, rows_out, train_files):  # the checkpoints as the selector got them
        for step, p in checkpoints:
            shutil.copytree(p, saved / str(step))
        return real(checkpoints, base_model, rows_out, train_files)
    snapshot.spec = real.spec
    out = train_stage(s, select=snapshot)
    sel = out.extra["selection"]
    steps = [c["step"] for c in sel["checkpoints"]]
    assert steps == list(range(1, STEPS + 1)) and sorted(int(p.name) for p in saved.iterdir()) == steps
    assert sel["n"] == 20 and sel["split"] == "custom" and out.params["select_by"] == f"{items}:20"
    assert sel["left_out_trained"] == 0  # items 100.. of dev; the stage trains on the first 16

    sel_rows = [json.loads(x) for x in (s / "output" / "selection.jsonl").read_text().splitlines()]
    acc = {}
    for c in sel["checkpoints"]:
        acc[c["step"]], rows = _recompute(tiny_llama, saved / str(c["step"]), items)
        mine = [r for r in sel_rows if r["step"] == c["step"]]
        assert len(mine) == 20
        for r in mine:  # the bench's very prompt, the same log-likelihoods and answer
            assert r["prompt_sha256"] == rows[r["id"]]["prompt_sha256"], r["id"]
            assert r["loglik"] == pytest.approx(rows[r["id"]]["ll"], abs=1e-3) and r["pred"] == rows[r["id"]]["pred"]
        assert c["accuracy"] == pytest.approx(acc[c["step"]], abs=1e-9)
        assert c["accuracy_ci95"][0] <= c["accuracy"] <= c["accuracy_ci95"][1]
    best = max(steps, key=lambda st: (acc[st], -st))
    print(f"dev accuracy per checkpoint (recomputed): {acc}; chosen step {sel['chosen_step']}")
    assert sel["chosen_step"] == best and len(set(acc.values())) > 1  # the choice is not a tie of all
    assert best != STEPS and sel["weights_from"] == f"checkpoint-{best}"  # not the last step's weights

    # output/ holds the chosen adapter, and `tools merge STAGE` merges what output/ holds
    import torch
    from safetensors.torch import load_file

    chosen = saved / str(best)
    kept, want = (load_file(str(d / "adapter_model.safetensors")) for d in (s / "output", chosen))
    assert kept.keys() == want.keys() and all(torch.equal(kept[k], want[k]) for k in want)
    assert (s / "output" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    r = tools_cli("merge", s, "--dry-run", "--out", tmp_path / "merged")
    assert r.returncode == 0 and f"--lora-model-dir {s / 'output'} " in r.stdout, r.stdout + r.stderr

    # tools plot draws the accuracy next to the loss, and says which step was kept
    r = tools_cli("plot", s, "--out", tmp_path / "plot.png")
    assert r.returncode == 0 and f"chosen step {best}" in r.stdout, r.stderr
    assert read_artifact(s / "output").extra["selection"]["checkpoints"] == sel["checkpoints"]
