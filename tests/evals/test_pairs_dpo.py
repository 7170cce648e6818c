"""Preference tuning on the model's own mistakes, end to end through the real CLIs on CPU: the merged
SFT model (the tiny Llama stands for it: SFT training and `tools merge` are tested in tests/recipes and
tests/release) is converted and benched on PubMedQA dev; its wrong answers become pairs
(`build-dataset pairs`); `tools stage dpo` + `tools train` run Axolotl's DPO on part of them, and on
the held-out pairs the chosen-minus-rejected log-probability margin must rise. A bench on the test
split can never become pairs (exit 2). ORPO and KTO: the stage writes the pairs in each one's layout
(checked with Axolotl's own prompt strategies), and KTO, the unpaired one, trains through Axolotl."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import gguf_path
from tools.artifact import Stage, read_artifact
from tools.io import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--device", "cpu", "--lora", "--micro-batch", "2", "--grad-accum", "1", "--no-packing", "--warmup-steps", "0",
        "--set", "optimizer=adamw_torch"]
HELD_OUT = 8
DPO_STEPS, DPO_LR = 2, "1e-2"  # measured: held-out margin -714.55 -> -713.44 nats (needs +0.05)


def _margin(model, tok, rows: list[dict]) -> float:
    """Mean of log p(chosen | prompt) - log p(rejected | prompt) over ``rows`` (ChatML prompt)."""
    import torch

    total = 0.0
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "system", "content": r["system"]},
                                          {"role": "user", "content": r["prompt"]}],
                                         tokenize=False, add_generation_prompt=True)
        n = len(tok(prompt)["input_ids"])
        side = {}
        for k in ("chosen", "rejected"):
            ids = tok(prompt + r[k] + "<|im_end|>")["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            side[k] = sum(float(logp[j - 1, ids[j]]) for j in range(n, len(ids)))
        total += side["chosen"] - side["rejected"]
    return total / len(rows)


def _pairs_artifact(out: Path, rows: list[dict], made_from: Path) -> Path:
    with Stage("dataset.pairs", out, {"rows": len(rows)}, inputs=[made_from]) as st:
        if not st.skipped:
            write_jsonl(st.path("train.jsonl"), rows)
    return out


def _fake_merge(out: Path, made_from: Path, base: Path) -> Path:
    """A `merge` artifact made from ``made_from`` (a train output), as `tools merge` writes it; the weights
    are ``base``'s (no merge run)."""
    with Stage("merge", out, {"fake": str(made_from)}, inputs=[made_from]) as st:
        for f in sorted(Path(base).iterdir()):
            if f.is_file():
                shutil.copy(f, st.path(f.name))
    return out


@pytest.mark.slow
def test_dpo_on_own_mistakes_raises_heldout_margin(tmp_path, tiny_llama, tools_cli):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def ok(*args):
        r = tools_cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    sft = _fake_trained_sft(tmp_path, tiny_llama)
    merged = _fake_merge(tmp_path / "merged", sft / "output", tiny_llama)
    gguf = gguf_path(json.loads(ok("convert", merged, "--outtype", "f32", "--fidelity-tokens", "0",
                                   "--out", tmp_path / "gguf", "--json").stdout))

    # test items never become pairs
    ok("bench", "pubmedqa", "--model", gguf, "--split", "test", "--limit", "1", "--mode", "loglik",
       "--out", tmp_path / "bench-test")
    r = tools_cli("build-dataset", "pairs", "--bench", tmp_path / "bench-test", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "test split" in r.stderr and not (tmp_path / "bad").exists(), r.stderr

    ok("bench", "pubmedqa", "--model", gguf, "--split", "dev", "--limit", "40", "--mode", "loglik",
       "--out", tmp_path / "bench-dev")
    ok("build-dataset", "pairs", "--bench", tmp_path / "bench-dev", "--out", tmp_path / "pairs")
    pairs = read_artifact(tmp_path / "pairs", stage="dataset.pairs")
    rows = [json.loads(x) for x in (pairs.path / "train.jsonl").read_text().splitlines()]
    wrong = [json.loads(x) for x in (tmp_path / "bench-dev" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == sum(not w["correct"] for w in wrong) > HELD_OUT + 8
    for r in rows:  # chosen: gold label + PubMedQA's long answer; rejected: the label the model preferred
        assert r["chosen"].startswith(r["meta"]["gold"] + ". ") and len(r["chosen"]) > 40
        assert r["rejected"] == r["meta"]["model_answer"] != r["meta"]["gold"]
    assert any(i["stage"].startswith("bench.") for i in pairs.manifest["inputs"])  # lineage

    train_pairs = _pairs_artifact(tmp_path / "train-pairs", rows[:-HELD_OUT], pairs.path)
    dpo = tmp_path / "dpo"
    ok("stage", "dpo", "--from", sft, "--merged", merged, "--pairs", train_pairs, "--out", dpo,
       "--max-steps", str(DPO_STEPS), "--lr", DPO_LR, "--set", f"save_steps={DPO_STEPS}", *FAST)
    cfg = yaml.safe_load((dpo / "axolotl.yaml").read_text())
    assert cfg["rl"] == "dpo" and cfg["base_model"] == str(merged.resolve())  # a new adapter on the merged SFT model
    ok("train", dpo)
    hist = read_artifact(dpo / "output").extra["log_history"]
    assert any("rewards/margins" in h for h in hist)  # TRL's DPO trainer ran

    tok = AutoTokenizer.from_pretrained(str(merged))
    base = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    held = rows[-HELD_OUT:]
    before = _margin(base, tok, held)
    after = _margin(PeftModel.from_pretrained(base, str(dpo / "output")).eval(), tok, held)
    print(f"held-out chosen-minus-rejected margin: {before:.3f} -> {after:.3f} nats ({HELD_OUT} pairs)")
    assert after > before + 0.05


def _fake_trained_sft(root: Path, base: Path) -> Path:
    """An SFT stage folder whose output is a trained adapter, as the manifests say (no training)."""
    s1 = root / "sft"
    with Stage("stage.sft", s1, {"kind": "sft", "mode": "lora", "preset": {"device": "cpu"}}) as st:
        st.path("axolotl.yaml").write_text("base_model: x\n")
    with Stage("train", s1 / "output", {"fake": True}, inputs=[s1]) as st:
        st.path("adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}))
        st.extra.update({"adapter": True, "base_model": str(base)})
    return s1


def _fake_full_sft(root: Path, base: Path) -> Path:
    """An SFT stage folder whose output is a full model: the tiny Llama itself (no SFT run)."""
    import shutil

    s1 = root / "sft-full"
    with Stage("stage.sft", s1, {"kind": "sft", "mode": "full", "preset": {"device": "cpu"}}) as st:
        st.path("axolotl.yaml").write_text("base_model: x\n")
    with Stage("train", s1 / "output", {"fake": True, "full": True}, inputs=[s1]) as st:
        for f in Path(base).iterdir():
            if f.is_file():
                shutil.copy(f, st.path(f.name))
        st.extra.update({"adapter": False, "base_model": str(base)})
    return s1


def test_grpo_is_written_and_checked_but_refused_on_cpu(tmp_path, tiny_llama, tools_cli):
    from evals.rewards import answer_correct

    s1 = _fake_trained_sft(tmp_path, tiny_llama)
    row = {"id": "1", "system": "s", "prompt": "Is it? Answer with yes, no or maybe.", "chosen": "yes. Because.",
           "rejected": "no", "meta": {"task": "pubmedqa", "gold": "yes", "labels": ["yes", "no", "maybe"]}}
    pairs = _pairs_artifact(tmp_path / "pairs", [row], s1)
    g = tmp_path / "grpo"
    r = tools_cli("stage", "dpo", "--from", s1, "--pairs", pairs, "--method", "grpo", "--out", g, "--device", "cpu",
                  "--lora", "--max-steps", "2")
    assert r.returncode == 0, r.stderr  # Axolotl's schema accepted it
    cfg = yaml.safe_load((g / "axolotl.yaml").read_text())
    assert cfg["rl"] == "grpo" and cfg["trl"]["use_vllm"] and cfg["trl"]["reward_funcs"] == ["evals.rewards.answer_correct"]
    r = tools_cli("train", g)
    assert r.returncode == 2 and "vLLM" in r.stderr and not (g / "output").exists(), r.stderr
    # a preference stage starts from a trained SFT stage: --base-model alone is refused
    r = tools_cli("stage", "dpo", "--base-model", tiny_llama, "--pairs", pairs, "--out", tmp_path / "x")
    assert r.returncode == 2
    # the reward is the bench's own answer check
    assert answer_correct(["p"] * 3, ["Yes, it is.", "no", [{"role": "assistant", "content": "maybe"}]],
                          meta=[row["meta"]] * 3) == [1.0, 0.0, 0.0]


PREF_PAIRS = [{"id": f"p{i}", "system": "Answer briefly.", "prompt": f"Does drug {i} lower blood pressure?",
               "chosen": "yes. The trial found a lower pressure.", "rejected": "no", "meta": {"gold": "yes"}}
              for i in range(8)]


def _stage_in_its_layout(tools_cli, tiny_llama, s1: Path, method: str, out: Path, *opts) -> dict:
    """`tools stage dpo --method METHOD` on PREF_PAIRS, and the check that the stage rewrote the pairs in the layout
    METHOD reads (ORPO: chosen/rejected as [user, assistant] turns; KTO: one desirable and one undesirable row
    per pair), that the YAML passed Axolotl's schema, and that Axolotl's own prompt strategy turns every written
    row into what TRL's trainer takes. Returns the stage's axolotl.yaml."""
    from axolotl.prompt_strategies.kto import load as load_kto
    from axolotl.prompt_strategies.orpo import load as load_orpo
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    load, want = {"orpo": (load_orpo, ("prompt", "chosen", "rejected")),
                  "kto": (load_kto, ("prompt", "completion", "label"))}[method]
    art = _pairs_artifact(out.with_name(out.name + "-pairs"), PREF_PAIRS, s1)
    r = tools_cli("stage", "dpo", "--from", s1, "--pairs", art, "--method", method, "--out", out, *opts)
    assert r.returncode == 0, r.stderr  # Axolotl's schema accepted it
    cfg = yaml.safe_load((out / "axolotl.yaml").read_text())
    assert cfg["rl"] == method and not cfg["sample_packing"]
    [ds] = cfg["datasets"]
    assert ds["path"] == str(out / "preference.jsonl")
    rows = [json.loads(x) for x in Path(ds["path"]).read_text().splitlines()]
    n = len(PREF_PAIRS)
    assert read_artifact(out).extra["preference_rows"] == {"file": "preference.jsonl", "method": method,
                                                          "pairs": n, "rows": len(rows)}
    fn = load(ds["type"], DictDefault(cfg), dataset_idx=0)
    assert fn is not None, ds["type"]
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    done = [fn(dict(row), tokenizer=tok) if method == "orpo" else fn(dict(row)) for row in rows]
    for d in done:
        assert all(d.get(k) is not None for k in want), d
        assert d["prompt"].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nDoes drug")
        assert d["prompt"].endswith("<|im_start|>assistant\n")
    if method == "orpo":
        assert len(done) == n and all(d["chosen"].startswith("yes. The trial") and d["rejected"].startswith("no")
                                      for d in done)
    else:  # unpaired: each pair gives one desirable and one undesirable completion of the same prompt
        assert cfg["remove_unused_columns"] is False
        assert [(d["completion"], d["label"]) for d in done[:2]] == [
            ("yes. The trial found a lower pressure.<|im_end|>", True), ("no<|im_end|>", False)]
        assert len(done) == 2 * n and sum(d["label"] for d in done) == n
    return cfg


def test_orpo_stage_writes_the_pairs_in_the_layout_axolotl_reads(tmp_path, tiny_llama, tools_cli):
    """ORPO reads another row layout than DPO's ChatML pairs: the stage rewrites them (KTO's layout: below)."""
    _stage_in_its_layout(tools_cli, tiny_llama, _fake_trained_sft(tmp_path, tiny_llama), "orpo", tmp_path / "orpo",
                         "--device", "cpu", "--lora", "--max-steps", "2")


@pytest.mark.slow
def test_kto_stage_writes_its_layout_and_trains_on_cpu_through_axolotl(tmp_path, tiny_llama, tools_cli):
    """KTO, unpaired (one desirable and one undesirable row per pair, and a KL term), is the layout furthest
    from DPO's: staged as above, it trains through the real Axolotl CLI on CPU; TRL's KTO trainer ran on
    chosen and rejected rows, and one update raised its reward margin. (ORPO's stage is checked the same way
    above; its training, through the same `tools train`, is left out for time.)"""
    s1 = _fake_full_sft(tmp_path, tiny_llama)
    out = tmp_path / "kto"
    _stage_in_its_layout(tools_cli, tiny_llama, s1, "kto", out,
                         "--max-steps", "2", "--lr", "5e-3", "--set", "save_steps=2", *FAST)
    r = tools_cli("train", out)
    assert r.returncode == 0, r.stderr[-3000:]
    hist = [h for h in read_artifact(out / "output").extra["log_history"] if "loss" in h]
    assert len(hist) == 2 and all("kl" in h and "logps/chosen" in h and "logps/rejected" in h for h in hist)
    print(f"kto on CPU: reward margin {hist[0]['rewards/margins']:.4f} -> {hist[-1]['rewards/margins']:.4f}")
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"]
