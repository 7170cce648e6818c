"""Training through the real `axolotl` CLI on CPU with the tiny Llama: a completion stage, an SFT
stage started from it (continuing its adapter), the SFT labels (loss on assistant turns only), and
a failed run that leaves no manifest. Few steps, short sequences, LoRA in fp32 (faster on CPU than
QLoRA, measured in recipes/train.py's module docstring)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import make_corpus, make_dataset
from tools.artifact import is_artifact, read_artifact

pytestmark = pytest.mark.slow

CPU_FAST = ["--device", "cpu", "--lora", "--max-steps", "2", "--micro-batch", "2", "--grad-accum", "1",
            "--no-packing", "--warmup-steps", "0", "--lr", "1e-2", "--set", "optimizer=adamw_torch"]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


def test_completion_then_sft_from_it(tmp_path, tiny_llama, tools_cli):
    from recipes.stage import StageSpec, write_stage
    from recipes.train import train_stage

    corpus = make_corpus(tmp_path / "corpus", n=16)
    dataset = make_dataset(tmp_path / "dataset", n=12)

    # stage one: completion, trained by the CLI as a user would
    s1 = tmp_path / "s1"
    r = tools_cli("stage", "completion", "--base-model", tiny_llama, "--corpus", corpus, "--out", s1,
                  "--seq-len", "128", *CPU_FAST)
    assert r.returncode == 0, r.stderr
    r = tools_cli("train", s1)
    assert r.returncode == 0, r.stderr[-3000:]
    out1 = read_artifact(s1 / "output", stage="train")
    e = out1.extra
    assert e["adapter"] is True and e["base_model"] == str(tiny_llama) and e["arch"] == "causal"
    assert [h["step"] for h in e["log_history"] if "loss" in h] == [1, 2]
    assert e["final_loss"] == [h["loss"] for h in e["log_history"] if "loss" in h][-1] > 0
    assert json.loads((s1 / "output" / "log_history.json").read_text()) == e["log_history"]
    assert not any("runtime" in k for h in e["log_history"] for k in h)  # no wall-clock figures in data
    assert (s1 / "output" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {"adapter_config.json", "adapter_model.safetensors", "log_history.json"} <= set(out1.outputs())
    assert out1.manifest["inputs"][0]["path"] == str(s1) and (s1 / "train.log").stat().st_size > 0
    # trained and up to date: a second run starts no Axolotl
    r = tools_cli("train", s1)
    assert r.returncode == 0 and "up to date" in r.stderr
    assert read_artifact(s1 / "output").manifest["finished"] == out1.manifest["finished"]

    # stage two: SFT named by stage one's manifest, trained through the Python API
    s2 = tmp_path / "s2"
    opts = {"max_steps": 2, "micro_batch": 2, "grad_accum": 1, "packing": False, "warmup_steps": 0, "lr": 1e-2}
    st = write_stage(StageSpec("sft", s2, from_stage=str(s1), data=[str(dataset)], **opts,
                                set_items=["optimizer=adamw_torch"]))
    assert st.extra["start"]["start"] == "adapter" and st.extra["preset"]["device"] == "cpu"  # inherited
    assert st.extra["mode"] == "lora"
    assert any(i["stage"] == "train" for i in st.manifest["inputs"])
    plan = train_stage(s2, dry_run=True)
    assert isinstance(plan, dict) and [c[1] for c in plan["commands"]] == ["train"] and not (s2 / "output").exists()
    out2 = train_stage(s2)
    e2 = out2.extra
    assert out2.stage == "train" and e2["adapter"] is True
    assert e2["base_model"] == str(tiny_llama) and e2["lora_model_dir"] == str(s1 / "output")
    assert [h["step"] for h in e2["log_history"] if "loss" in h] == [1, 2]
    a1, a2 = _adapter(s1 / "output"), _adapter(s2 / "output")
    assert a1.keys() == a2.keys()  # the same adapter, trained further
    assert any(not (a1[k] == a2[k]).all() for k in a1)

    # the SFT labels: only assistant turns (and their end-of-turn) carry loss
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prepared = [load_from_disk(str(p)) for p in sorted((s2 / "prepared").iterdir()) if p.is_dir()]
    assert len(prepared) == 1
    ds = prepared[0]
    answers = sorted(json.loads(ln)["messages"][-1]["content"] for ln in
                     (dataset / "train.jsonl").read_text().splitlines())
    assert len(ds) == len(answers)
    got = []
    for row in ds:
        ids, labels = row["input_ids"], row["labels"]
        kept = [i for i, lab in zip(ids, labels) if lab != -100]
        assert all(lab in (-100, i) for i, lab in zip(ids, labels))
        assert len(kept) < len(ids) / 10  # system + user + template tokens are masked
        text = tok.decode(kept)
        assert text.endswith("<|im_end|>"), text
        got.append(text.removesuffix("<|im_end|>").strip())
        # every masked stretch holds the prompt: the user's question is never trained on
        masked = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
        assert "<|im_start|>user" in masked and "<|im_start|>assistant" in masked
    assert sorted(got) == answers

    # with stage one merged (a `merge` artifact made from its output) SFT trains a new adapter on it
    import yaml

    from tools.artifact import Stage
    from tools.errors import UserError

    def fake_merge(out, made_from):  # the files release's merge writes; here a copy of the base
        with Stage("merge", out, {"m": str(made_from)}, inputs=[made_from]) as mst:
            for f in sorted(Path(tiny_llama).iterdir()):
                if f.is_file():
                    shutil.copy(f, mst.path(f.name))
        return out
    m1 = fake_merge(tmp_path / "merged1", s1 / "output")
    s3 = write_stage(StageSpec("sft", tmp_path / "s3", from_stage=str(s1), merged=str(m1), data=[str(dataset)], **opts))
    cfg3 = yaml.safe_load((s3.path / "axolotl.yaml").read_text())
    assert cfg3["base_model"] == str(m1) and "lora_model_dir" not in cfg3 and s3.extra["start"]["start"] == "merged"
    m2 = fake_merge(tmp_path / "merged2", s2 / "output")
    with pytest.raises(UserError, match="not made from stage one"):
        write_stage(StageSpec("sft", tmp_path / "s4", from_stage=str(s1), merged=str(m2), data=[str(dataset)]))


def test_failed_run_exits_1_and_leaves_no_manifest(tmp_path, tiny_llama, tools_cli):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    corpus = make_corpus(tmp_path / "corpus", n=4)
    s = tmp_path / "s"
    r = tools_cli("stage", "completion", "--base-model", base, "--corpus", corpus, "--out", s, "--seq-len", "128",
                  *CPU_FAST)
    assert r.returncode == 0, r.stderr
    (base / "tokenizer.json").write_text("{ not json")  # Axolotl cannot load the tokenizer any more
    (base / "tokenizer.model").unlink()
    r = tools_cli("train", s)
    assert r.returncode == 1, r.stderr[-2000:]
    msg = [ln for ln in r.stderr.splitlines() if ln.startswith("failed:")]
    assert msg and "axolotl train failed before training started" in msg[0] and str(s / "train.log") in msg[0]
    assert not is_artifact(s / "output") and not list(s.glob(".output.partial-*"))
    assert not (s / "checkpoints").exists()  # nothing was checkpointed: nothing kept to resume from
    assert "Traceback" in (s / "train.log").read_text()
