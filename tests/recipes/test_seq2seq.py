"""The seq2seq (T5) LoRA path: a tiny T5 built here trains a few LoRA steps through Seq2SeqTrainer."""
from __future__ import annotations

import json

import pytest

from tools.artifact import Stage
from tools.errors import UserError

QA = [("Is hypertension a risk factor for stroke?", "yes"),
      ("Does insulin lower blood glucose?", "yes"),
      ("Is salbutamol an antibiotic?", "no"),
      ("Can appendicitis cause right iliac fossa pain?", "yes"),
      ("Is aspirin a diuretic?", "no"),
      ("Do thiazides treat hypertension?", "yes"),
      ("Is asthma caused by a virus in every patient?", "maybe"),
      ("Is pneumonia treated with antibiotics?", "yes")]


def make_dataset(out, n_train=16, n_val=4):
    with Stage("dataset.test", out, {"n": n_train}) as st:
        for name, n in (("train.jsonl", n_train), ("validation.jsonl", n_val)):
            if n == 0:
                continue
            with open(st.path(name), "w", encoding="utf-8") as f:
                for i in range(n):
                    q, a = QA[i % len(QA)]
                    f.write(json.dumps({"id": f"{name[0]}{i}", "meta": {}, "messages": [
                        {"role": "system", "content": "You are a medical assistant."},
                        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return out


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A tiny random T5 (gated-gelu feed-forward, like T5 v1.1/Flan-T5) + a unigram tokenizer trained here."""
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    out = tmp_path_factory.mktemp("tiny-t5")
    lines = [f"#### Question:{q}\n#### Answer: {a}" for q, a in QA] * 10
    prefix = out / "spm"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", minloglevel=2, num_threads=1,
                                   hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    tok = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], extra_ids=0)
    tok.model_max_length = 512
    for f in out.glob("spm.*"):
        f.unlink()
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   tie_word_embeddings=False)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def expected_lora_params(cfg: dict, r: int, ffn: bool) -> int:
    """LoRA adds r*(in+out) per targeted Linear: q,k,v,o in every encoder self-attention and decoder
    self- and cross-attention; with ffn, wi_0, wi_1, wo in every encoder and decoder block."""
    d, inner, dff = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    attn_blocks = cfg["num_layers"] + 2 * cfg["num_decoder_layers"]
    n = attn_blocks * 4 * r * (d + inner)
    if ffn:
        n += (cfg["num_layers"] + cfg["num_decoder_layers"]) * 3 * r * (d + dff)
    return n


def _adapter_numel(path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            n += f.get_tensor(k).numel()
    return n


@pytest.mark.slow
def test_tiny_t5_trains_lora_on_attention(tiny_t5, tmp_path):
    from recipes.seq2seq import train, write_stage

    data = make_dataset(tmp_path / "data")
    params = {"max_steps": 6, "micro_batch_size": 4, "learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8,
              "lora_dropout": 0.0, "sequence_len": 2048, "preset": "cpu"}
    stage = write_stage(tmp_path / "stage", tiny_t5, [str(data)], params)
    assert stage.stage == "stage.sft" and stage.extra["arch"] == "seq2seq"
    conf = json.loads((stage.path / "seq2seq.json").read_text())
    assert conf["target_modules"] == ["q", "k", "v", "o"]
    assert conf["max_source_length"] == 512, "source length is capped at 512"
    assert conf["prompt"] == "#### Question:{question}\n#### Answer:"
    assert conf["ignored"] == {"preset": "cpu"}
    assert (stage.path / "launch.sh").read_text().count("tools train") == 1

    assert train(stage.path, dry_run=True).path == stage.path
    assert not (stage.path / "output").exists(), "a dry run trains nothing"

    art = train(stage.path)
    assert art.stage == "train" and art.path == stage.path / "output"
    assert {"adapter_config.json", "adapter_model.safetensors", "log_history.json"} <= set(art.outputs())
    ex = art.extra
    assert ex["adapter"] is True and ex["base_model"] == str(tiny_t5.resolve()) and ex["steps"] == 6
    cfg = json.loads((tiny_t5 / "config.json").read_text())
    want = expected_lora_params(cfg, 4, ffn=False)
    assert ex["trainable_params"] == want == _adapter_numel(art.path / "adapter_model.safetensors")
    hist = json.loads((art.path / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 6 and ex["final_loss"] == losses[-1]
    assert losses[-1] < losses[0], losses
    assert "eval_loss" in ex and any("eval_loss" in h for h in hist), "validation split evaluated"
    assert not any(k.endswith("_runtime") for h in hist for k in h), "no wall-clock figures in data files"
    adapter_cfg = json.loads((art.path / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["k", "o", "q", "v"]

    # same stage, same seed: byte-identical adapter
    stage2 = write_stage(tmp_path / "stage2", tiny_t5, [str(data)], params)
    art2 = train(stage2.path)
    assert (art2.path / "adapter_model.safetensors").read_bytes() == (art.path / "adapter_model.safetensors").read_bytes()

    # the trained adapter answers; its predictions feed `tools eval semantic`
    from evals.semantic import load_pairs
    from recipes.seq2seq import predict

    pred = predict(art.path, data, tmp_path / "pred", split="validation", max_new_tokens=4)
    pairs = load_pairs(results=pred.path)
    assert len(pairs) == 4 and all(set(p) == {"id", "prediction", "reference"} for p in pairs)
    assert [p["reference"] for p in pairs] == [a for _, a in QA[:4]]

    # the same through `tools eval semantic --seq2seq` (in-process)
    from click.testing import CliRunner

    from tools.cli import cli
    from tools.paths import embedded_embedder

    r = CliRunner().invoke(cli, ["eval", "semantic", "--seq2seq", str(art.path), "--data", str(data), "--split",
                                 "validation", "--max-new-tokens", "4", "--bertscore-model", "none", "--nli-model",
                                 "none", "--semscore-model", str(embedded_embedder()), "--out", str(tmp_path / "sem"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])["results"]
    assert res["n"] == 4 and set(res["metrics"]) == {"semscore"} and set(res["skipped"]) == {"bertscore_f1", "nli_entailment"}
    assert (tmp_path / "sem-predictions" / "items.jsonl").is_file()


@pytest.mark.slow
def test_ffn_option_targets_the_feed_forward_too(tiny_t5, tmp_path):
    from recipes.seq2seq import train, write_stage

    data = make_dataset(tmp_path / "data", n_train=4, n_val=0)
    stage = write_stage(tmp_path / "stage", tiny_t5, [str(data)], {"max_steps": 1, "lora_r": 2, "ffn": True})
    assert stage.extra["target_modules"] == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    art = train(stage.path)
    cfg = json.loads((tiny_t5 / "config.json").read_text())
    assert art.extra["trainable_params"] == expected_lora_params(cfg, 2, ffn=True)
    assert art.extra["trainable_params"] > expected_lora_params(cfg, 2, ffn=False)
    assert "eval_loss" not in art.extra


def test_bad_stage_input_is_one_clear_error(tiny_t5, tmp_path):
    from transformers import LlamaConfig

    from recipes.seq2seq import train, write_stage

    data = make_dataset(tmp_path / "data", n_train=2, n_val=0)
    with pytest.raises(UserError, match=r"^learning_rat: unknown seq2seq parameter"):
        write_stage(tmp_path / "s", tiny_t5, [str(data)], {"learning_rat": 1e-3})
    with pytest.raises(UserError, match="QLoRA"):
        write_stage(tmp_path / "s", tiny_t5, [str(data)], {"load_in_4bit": True})
    with pytest.raises(UserError, match=r"^max_source_length: must be between 1 and 512"):
        write_stage(tmp_path / "s", tiny_t5, [str(data)], {"max_source_length": 1024})
    with pytest.raises(UserError, match=r"^lora_r: expected int"):
        write_stage(tmp_path / "s", tiny_t5, [str(data)], {"lora_r": "8"})
    causal = tmp_path / "llama"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(causal)
    with pytest.raises(UserError, match=r"config.json \[model_type\].*'llama'"):
        write_stage(tmp_path / "s", causal, [str(data)], {})
    bad = tmp_path / "bad-data"
    with Stage("dataset.test", bad, {}) as st:
        st.path("train.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:1 \[messages\]: needs a user and an assistant"):
        write_stage(tmp_path / "s", tiny_t5, [str(bad)], {})
    assert not (tmp_path / "s").exists(), "nothing half-written"
    with Stage("stage.sft", tmp_path / "axo", {}) as st:
        st.path("axolotl.yaml").write_text("base_model: x\n")
    with pytest.raises(UserError, match="not a seq2seq stage"):
        train(tmp_path / "axo")


def test_memory_works_on_a_seq2seq_stage(tiny_t5, tmp_path, tools_cli):
    """`tools memory` reads the seq2seq stage (seq2seq.json) and measures a T5 like a causal model."""
    from recipes.seq2seq import write_stage

    data = make_dataset(tmp_path / "data")
    stage = write_stage(tmp_path / "stage", tiny_t5, [str(data)], {"lora_r": 4, "max_steps": 1})
    p = tools_cli("memory", stage.path, "--regime", "full", "--regime", "lora", "--seq-len", "16", "--json")
    assert p.returncode == 0, p.stderr
    full, lora = json.loads(p.stdout)["results"]
    cfg = json.loads((tiny_t5 / "config.json").read_text())
    assert lora["trainable_params"] == expected_lora_params(cfg, 4, ffn=False)
    assert lora["trainable_mb"] < full["trainable_mb"] / 5 and lora["activation_mb"] > 0
    assert lora["frozen_mb"] + lora["trainable_mb"] == pytest.approx(lora["total_param_mb"])


def test_stage_sft_arch_seq2seq_through_the_cli(tiny_t5, tmp_path):
    """`tools stage sft --arch seq2seq`: the stage options reach the seq2seq config; a GPU preset is refused."""
    from click.testing import CliRunner

    from tools.cli import cli

    data = make_dataset(tmp_path / "data")
    args = ["stage", "sft", "--arch", "seq2seq", "--base-model", str(tiny_t5), "--dataset", str(data)]
    r = CliRunner().invoke(cli, [*args, "--lora-r", "4", "--max-steps", "1", "--lr", "0.01", "--out",
                                 str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    man = json.loads(r.stdout)["manifest"]
    assert man["stage"] == "stage.sft" and man["extra"]["arch"] == "seq2seq"
    cfg = json.loads((tmp_path / "s" / "seq2seq.json").read_text())
    assert (cfg["lora_r"], cfg["max_steps"], cfg["learning_rate"]) == (4, 1, 0.01)
    r = CliRunner().invoke(cli, [*args, "--gpus", "2", "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "one process" in r.output and not (tmp_path / "g").exists()
