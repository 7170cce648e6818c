"""General ability and replay: `tools eval general` (perplexity on held-out general English with a
bootstrap interval), its paired difference in `tools report --general`, the general corpus that
ships with Python, and `--replay DATA --replay-ratio` mixing it into a stage deterministically."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import fake_bench, make_adapter, make_corpus
from tools.artifact import read_artifact

pytestmark = pytest.mark.usefixtures("one_thread")


def test_general_corpus_halves_are_disjoint():
    from corpora.general import heldout_text, topics

    held, replay = dict(topics("heldout")), dict(topics("replay"))
    assert held and replay and not set(held) & set(replay)
    assert all(t not in heldout_text() for t in list(replay.values())[:5])


def test_eval_general_interval_and_paired_verdict(tmp_path, tiny_llama, smollm2_gguf, tools_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.general import run_general

    r = tools_cli("eval", "general", "--model", smollm2_gguf, "--ctx", "32", "--max-tokens", "256",
                  "--out", tmp_path / "g-emb", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"]
    assert res["windows"] == 8 and res["tokens"] == 8 * 31
    lo, hi = res["perplexity_ci95"]
    print(f"embedded SmolLM2 Q4_1 general perplexity {res['perplexity']} [{lo}, {hi}]")
    assert 1 < lo < res["perplexity"] < hi < 1000

    # a base and a "tuned" tiny model (a random adapter merged): the same windows, paired
    tuned = tmp_path / "tuned"
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    PeftModel.from_pretrained(m, str(make_adapter(tiny_llama, tmp_path / "ad"))).merge_and_unload().save_pretrained(tuned)
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(tuned)
    for name, model in (("g-base", tiny_llama), ("g-tuned", tuned)):  # in-process: the CLI ran above
        run_general(model, tmp_path / name, ctx=64, max_tokens=1024)
    a = fake_bench(tmp_path, "bench-base", [True, False, True], ["yes", "no", "yes"])
    b = fake_bench(tmp_path, "bench-tuned", [True, True, True], ["yes", "no", "yes"])
    r = tools_cli("report", a, b, "--general", tmp_path / "g-base", "--general", tmp_path / "g-tuned",
                  "--out", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    gen = json.loads(r.stdout)["results"]["general"]
    pa, pb = (json.loads((tmp_path / n / "results.json").read_text())["perplexity"] for n in ("g-base", "g-tuned"))
    assert gen["perplexity_change_pct"] == pytest.approx(100 * (pb / pa - 1), abs=0.05)
    lo, hi = gen["perplexity_change_pct_ci95"]
    assert lo <= gen["perplexity_change_pct"] <= hi
    assert gen["verdict"].startswith("general ability: perplexity") and gen["verdict"] in \
        (tmp_path / "rep" / "report.md").read_text()
    print(gen["verdict"])
    # two runs of different text windows are not paired
    r = tools_cli("report", a, b, "--general", tmp_path / "g-base", "--general", tmp_path / "g-emb",
                  "--out", tmp_path / "rep2")
    assert r.returncode == 2 and "--general" in r.stderr


def test_replay_mixes_a_seeded_share_into_the_stage(tmp_path, tiny_llama, tools_cli):
    corpus = make_corpus(tmp_path / "clinical", n=16)
    r = tools_cli("build-corpus", "general", "--out", tmp_path / "general")
    assert r.returncode == 0, r.stderr
    assert read_artifact(tmp_path / "general").lineage.licenses == {"PSF-2.0 (CPython documentation)"}

    def stage(out, *extra):
        return tools_cli("stage", "completion", "--base-model", tiny_llama, "--corpus", corpus, "--out", out,
                         "--device", "cpu", "--lora", "--seq-len", "128", *extra)
    r = stage(tmp_path / "s", "--replay", tmp_path / "general", "--replay-ratio", "0.2")
    assert r.returncode == 0, r.stderr
    art = read_artifact(tmp_path / "s")
    rep = art.extra["replay"]
    assert rep["rows_own"] == 16 and rep["rows_replay"] == 4 and rep["ratio"] == 0.2  # 4 / (16 + 4) = 0.2
    rows = (tmp_path / "s" / "replay.jsonl").read_text().splitlines()
    general_ids = {json.loads(x)["id"] for x in (tmp_path / "general" / "corpus.jsonl").read_text().splitlines()}
    assert len(rows) == 4 and {json.loads(x)["id"] for x in rows} <= general_ids
    cfg = yaml.safe_load((tmp_path / "s" / "axolotl.yaml").read_text())
    assert [d["path"] for d in cfg["datasets"]][-1] == str(tmp_path / "s" / "replay.jsonl")
    assert any(i["path"] == str(tmp_path / "general") for i in art.manifest["inputs"])
    # deterministic: the same sample drawn again here, in another process (no second stage written)
    from recipes.stage import StageSpec, replay_rows
    again = replay_rows(StageSpec.from_params(art.params, tmp_path / "s2"), [corpus / "corpus.jsonl"])
    assert again["rows"] == [json.loads(x) for x in rows] and again["rows_replay"] == 4
    for bad in (["--replay-ratio", "0.2"], ["--replay", tmp_path / "general", "--replay-ratio", "1.5"]):
        r = stage(tmp_path / "bad", *bad)
        assert r.returncode == 2 and "--replay" in r.stderr and not (tmp_path / "bad").exists(), r.stderr


def _tiny_that_knows_general_english(tiny, out, steps: int = 50):
    """The random tiny Llama trained (plain PyTorch, seeded, one thread) on the replay half of the general
    corpus, so that it has a general ability to lose; the held-out half stays unseen."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corpora.general import topics

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    try:
        tok = AutoTokenizer.from_pretrained(str(tiny))
        model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).train()
        ids = tok("\n\n".join(text for _, text in topics("replay")), add_special_tokens=False)["input_ids"]
        blocks = torch.tensor([ids[i:i + 128] for i in range(0, len(ids) - 128, 128)])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        pick = torch.Generator().manual_seed(0)
        for _ in range(steps):
            batch = blocks[torch.randint(len(blocks), (8,), generator=pick)]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copy(tiny / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.mark.slow
def test_replay_loses_less_general_ability(tmp_path, tiny_llama, tools_cli):
    """The tiny Llama, given some general English first, trained hard (LoRA, high lr) on a small clinical
    corpus loses general perplexity; the same stage with 10 % general replay loses less. (The perplexities
    are `tools eval general`'s own function, in-process: its CLI runs in the test above.)"""
    from evals.general import run_general

    base = _tiny_that_knows_general_english(tiny_llama, tmp_path / "base")
    corpus = make_corpus(tmp_path / "clinical", n=16)
    assert tools_cli("build-corpus", "general", "--out", tmp_path / "general").returncode == 0
    hard = ["--device", "cpu", "--lora", "--seq-len", "128", "--max-steps", "12", "--lr", "1e-2", "--micro-batch", "2",
            "--grad-accum", "1", "--warmup-steps", "0", "--no-packing", "--lora-r", "16",
            "--target", "q_proj,k_proj,v_proj,o_proj", "--set", "optimizer=adamw_torch",
            "--set", "save_steps=12"]  # one checkpoint, at the end: a save costs more than a step here
    for name, extra in (("plain", []), ("replay", ["--replay", tmp_path / "general", "--replay-ratio", "0.1"])):
        s = tmp_path / name
        r = tools_cli("stage", "completion", "--base-model", base, "--corpus", corpus, "--out", s, *hard, *extra)
        assert r.returncode == 0, r.stderr
        r = tools_cli("train", s)
        assert r.returncode == 0, r.stderr[-3000:]
    ppl = {name: run_general(model, tmp_path / f"g-{name}", ctx=128, max_tokens=1024).extra["perplexity"]
           for name, model in (("base", base), ("plain", tmp_path / "plain" / "output"),
                               ("replay", tmp_path / "replay" / "output"))}
    print(f"general perplexity: base {ppl['base']}, clinical only {ppl['plain']}, with 10 % replay {ppl['replay']}")
    assert ppl["plain"] > 1.2 * ppl["base"] and ppl["replay"] < ppl["plain"]


def test_card_states_the_chosen_checkpoint_and_the_replay(tmp_path):
    from release.card import _training_notes
    from tools.artifact import Stage

    s = tmp_path / "stage"
    with Stage("stage.completion", s, {"k": 1}) as st:
        st.path("axolotl.yaml").write_text("x: 1\n")
        st.extra["replay"] = {"rows_replay": 2, "rows_own": 16, "ratio": 0.1}
    with Stage("train", s / "output", {"k": 1}, inputs=[s]) as st:
        st.path("adapter_config.json").write_text("{}")
        st.extra.update({"stage_dir": str(s), "selection": {
            "by": "pubmedqa-dev:20", "n": 20, "chosen_step": 2, "last_step": 4,
            "checkpoints": [{"step": 2, "accuracy": 0.65, "accuracy_ci95": [0.43, 0.82]},
                            {"step": 4, "accuracy": 0.6, "accuracy_ci95": [0.39, 0.78]}]}})
    notes = _training_notes([read_artifact(s / "output")])
    assert notes[0].startswith("- Checkpoint: step 2 of 4, the best of 2 on 20 dev items (pubmedqa-dev:20)")
    assert "65.0%" in notes[0] and "2 general rows mixed into 16 (10.0%" in notes[1]
