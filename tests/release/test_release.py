"""Release: merge, convert, quantize, inspect, compare-quant (model work; see test_release_hub.py for card/push).

End to end on CPU: tiny Llama + LoRA -> merge -> f16 GGUF -> Q3_K_L -> loads and generates in
llama_cpp; the real SmolLM2 (HF form) -> f16 -> Q3_K_L -> file type Q3_K_L, template, sane text.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import make_adapter, shared_tiny_f16
from tools.errors import UserError

# -- helpers ---------------------------------------------------------------------------------------

def load_safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def one_line_error(p) -> str:
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


def generate(gguf: Path, prompt: str, n: int = 12, chat: bool = False) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=1, seed=0, verbose=False)
    try:
        if chat:
            r = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                           temperature=0.0, top_k=1)
            return r["choices"][0]["message"]["content"]
        r = llm(prompt, max_tokens=n, temperature=0.0, top_k=1)
        return r["choices"][0]["text"], r["usage"]["completion_tokens"]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tiny_f16(tiny_llama, tmp_path_factory):
    """The tiny Llama's f16 GGUF, converted once per run for every module that asks (tests.helpers)."""
    return shared_tiny_f16(tmp_path_factory, tiny_llama)


# -- names and types (fast) ------------------------------------------------------------------------

def test_every_llama_cpp_type_name_resolves():
    import llama_cpp

    from release.ggufinfo import ftype_names, primary_tensor_type, resolve_ftype

    names = [a[len("LLAMA_FTYPE_MOSTLY_"):] for a in dir(llama_cpp) if a.startswith("LLAMA_FTYPE_MOSTLY_")]
    assert "Q3_K_L" in names and len(names) > 25
    for n in names:
        assert resolve_ftype(n.lower()) == (n, getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + n))
    assert set(ftype_names()) == set(names) | {"F32"}
    assert resolve_ftype("Q4_K")[0] == "Q4_K_M"  # llama-quantize's alias
    assert primary_tensor_type("Q3_K_L") == "Q3_K" and primary_tensor_type("IQ3_M") == "IQ3_S"
    assert primary_tensor_type("Q8_0") == "Q8_0"
    with pytest.raises(UserError, match="unknown quantization type 'Q3_K_XL'"):
        resolve_ftype("Q3_K_XL")


def test_gguf_naming_convention():
    from release.ggufinfo import gguf_filename

    meta = {"general.basename": "MediLoRA", "general.size_label": "135M", "general.finetune": "pubmedqa-sft",
            "general.name": "ignored"}
    assert gguf_filename(meta, "Q3_K_L") == "MediLoRA-135M-pubmedqa-sft-Q3_K_L.gguf"
    assert gguf_filename({"general.name": "Tiny model"}, "f16") == "Tiny-model-F16.gguf"


# -- bad input: one line, exit 2, nothing written --------------------------------------------------

def test_bad_inputs_one_line_exit_2_no_output(tools_cli, tiny_f16, tiny_llama, tmp_path):
    f16 = tiny_f16.path / tiny_f16.extra["file"]

    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    line = one_line_error(tools_cli("inspect", text))
    assert "not a GGUF file" in line and str(text) in line

    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(f16.read_bytes()[: f16.stat().st_size // 2])
    out = tmp_path / "q-trunc"
    line = one_line_error(tools_cli("quantize", trunc, "--q", "Q4_0", "--out", out))
    assert "truncated" in line and str(trunc) in line
    head = tmp_path / "head.gguf"
    head.write_bytes(f16.read_bytes()[:100])  # inside the metadata
    line = one_line_error(tools_cli("quantize", head, "--q", "Q4_0", "--out", out))
    assert "truncated or corrupt GGUF" in line
    assert not out.exists()

    line = one_line_error(tools_cli("quantize", f16, "--q", "Q9_K", "--out", out))
    assert "unknown quantization type 'Q9_K'" in line and "Q3_K_L" in line
    assert not out.exists()

    merged = tmp_path / "merged"
    line = one_line_error(tools_cli("merge", "--base", tiny_llama, "--adapter", tmp_path / "no-adapter", "--out", merged))
    assert "adapter folder not found" in line and "no-adapter" in line
    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    line = one_line_error(tools_cli("merge", "--base", tiny_llama, "--adapter", empty, "--out", merged))
    assert "no adapter_config.json" in line
    assert not merged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-adapter", "head.gguf", "notes.gguf", "trunc.gguf"]


def test_requantize_refused_unless_allowed(tools_cli, tiny_f16, tmp_path):
    f16 = tiny_f16.path / tiny_f16.extra["file"]
    tools_cli("quantize", f16, "--q", "Q8_0", "--out", tmp_path / "q8", check=True)
    q8 = next((tmp_path / "q8").glob("*.gguf"))
    line = one_line_error(tools_cli("quantize", q8, "--q", "Q4_0", "--out", tmp_path / "q4"))
    assert "already quantized (Q8_0)" in line and "--allow-requantize" in line
    assert not (tmp_path / "q4").exists()
    p = tools_cli("quantize", q8, "--q", "Q4_0", "--allow-requantize", "--out", tmp_path / "q4", "--json", check=True)
    assert json.loads(p.stdout)["manifest"]["extra"]["file_type"] == "Q4_0"


# -- tiny Llama end to end -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.native
def test_tiny_llama_lora_merge_convert_quantize_generate(tools_cli, tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    merged = tmp_path / "merged"
    tools_cli("merge", "--base", tiny_llama, "--adapter", adapter, "--out", merged, check=True)

    # the merge really folded B @ A * alpha / r into the weights
    base_w, merged_w, ad = load_safetensors(tiny_llama), load_safetensors(merged), load_safetensors(adapter)
    key = "model.layers.0.self_attn.q_proj.weight"
    a = ad["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = ad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert b.abs().sum() > 0
    expected = base_w[key] + (b @ a) * (8 / 4)
    assert (merged_w[key] - base_w[key]).abs().max() > 1e-3
    assert (merged_w[key] - expected).abs().max() < 1e-5
    assert not any("lora" in k for k in merged_w)
    m = json.loads((merged / "manifest.json").read_text())
    assert m["stage"] == "merge" and m["extra"]["dtype"] == "float32" and m["extra"]["chat_template"]
    assert (merged / "tokenizer.model").is_file() and (merged / "chat_template.jinja").is_file()

    p = tools_cli("convert", merged, "--outtype", "f16", "--out", tmp_path / "f16", "--json", check=True)
    conv = json.loads(p.stdout)["manifest"]["extra"]
    assert conv["file_type"] == "F16" and conv["file"].endswith("-F16.gguf")

    p = tools_cli("quantize", tmp_path / "f16", "--q", "Q3_K_L", "--out", tmp_path / "q3", "--json", check=True)
    d = json.loads(p.stdout)
    q = d["manifest"]["extra"]
    gguf = Path(d["path"]) / q["file"]
    assert gguf.name.endswith("-Q3_K_L.gguf") and gguf.is_file()
    assert q["file_type"] == "Q3_K_L"
    # hidden size 64: no row is a multiple of 256, so llama.cpp put no Q3_K tensor in: we must say so
    assert q["primary_type_share"] < 0.5 and "Q3_K" not in q["tensor_types"]
    assert "warning: requested Q3_K_L" in p.stderr and "bits per weight" in p.stderr
    assert q["size_bytes"] < q["source_size_bytes"]

    info = json.loads(tools_cli("inspect", gguf, "--json", check=True).stdout)["results"]
    template = (merged / "chat_template.jinja").read_text()
    assert info["chat_template"] == template
    assert info["architecture"] == "llama" and info["file_type"] == "Q3_K_L"
    assert sum(h["elements"] for h in info["tensor_types"].values()) == info["parameters"]
    human = tools_cli("inspect", gguf, check=True).stdout
    assert "file type     Q3_K_L" in human and "Q4_0" in human and "<|im_start|>" in human
    assert "general.file_type = 13" in human

    text, n = generate(gguf, "The patient", n=8)
    assert n > 0

    # same input + type -> byte-identical output (the library call the verb makes, in this process)
    from release.quantize import quantize_stage

    again = quantize_stage(tmp_path / "f16", "Q3_K_L", tmp_path / "q3b")
    assert (again.path / again.extra["file"]).read_bytes() == gguf.read_bytes()
    # up to date: a second run does nothing
    p = tools_cli("quantize", tmp_path / "f16", "--q", "Q3_K_L", "--out", tmp_path / "q3")
    assert p.returncode == 0 and "up to date" in p.stderr


@pytest.mark.slow
def test_merge_keeps_bf16_base_dtype(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from release.merge import merge_peft

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(base)
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    art = merge_peft(base, adapter, tmp_path / "merged")
    assert art.extra["dtype"] == "bfloat16"
    w = load_safetensors(art.path)
    assert {t.dtype for t in w.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_axolotl_merge_of_a_stage_folder_matches_peft(tiny_llama, tmp_path, tools_cli):
    import yaml

    from recipes.axolotl_cpu import CPU_KEYS
    from release.merge import merge_peft
    from tools.artifact import Stage

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    stage = tmp_path / "stage"
    stage.mkdir()
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"id": "1", "text": "hello", "source": "test"}\n')
    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
           "lora_target_modules": ["q_proj", "v_proj", "down_proj"], "sequence_len": 64, "micro_batch_size": 1,
           "gradient_accumulation_steps": 1, "num_epochs": 1, "learning_rate": 1e-4, "optimizer": "adamw_torch",
           "datasets": [{"path": str(data), "type": "completion", "ds_type": "json"}],
           "output_dir": str(stage / "output"), **CPU_KEYS}
    (stage / "axolotl.yaml").write_text(yaml.safe_dump(cfg))
    with Stage("train", stage / "output", {"test": True}) as st:
        for f in adapter.iterdir():
            shutil.copy2(f, st.path(f.name))
        st.extra.update({"base_model": str(tiny_llama), "adapter": "lora"})

    dry = tools_cli("merge", stage, "--dry-run", check=True)
    assert "axolotl merge-lora" in dry.stdout and not (stage / "merged").exists()
    p = tools_cli("merge", stage, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["manifest"]["extra"]["method"] == "axolotl" and Path(out["path"]) == stage / "merged"
    ref = merge_peft(tiny_llama, adapter, tmp_path / "peft-merged")
    a, b = load_safetensors(stage / "merged"), load_safetensors(ref.path)
    assert set(a) == set(b)
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() < 1e-5, k
    assert (stage / "merged" / "tokenizer.model").is_file()


# -- SmolLM2 (real model, HF form) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_ggufs(smollm2_f16, tmp_path_factory):
    from release.quantize import quantize_stage

    q3 = quantize_stage(smollm2_f16.path, "Q3_K_L", tmp_path_factory.mktemp("smol") / "q3")
    return smollm2_f16, q3


@pytest.mark.slow
@pytest.mark.native
def test_smollm2_f16_to_q3_k_l(smol_ggufs, smollm2_hf):
    """The file type, template and tensor mix as the quantize stage read them back from the file, the template
    and tokenizer as llama.cpp itself reads them (no second pass of the Python GGUF reader over 49k tokens)."""
    import llama_cpp

    from release.convert import hf_chat_template
    from tools.paths import embedded_gguf

    f16, q3 = smol_ggufs
    gguf = q3.path / q3.extra["file"]
    info = q3.extra
    assert info["file_type"] == "Q3_K_L" and info["architecture"] == "llama"
    # hidden 576 is not a multiple of 256: measured mix, no Q3_K at all, ~5.7 bits per weight
    assert "Q3_K" not in info["tensor_types"]
    assert 5.0 < info["bits_per_weight"] < 6.5
    assert q3.extra["mostly_applied"] is False
    assert gguf.stat().st_size < 0.5 * (f16.path / f16.extra["file"]).stat().st_size
    # the tokenizer survived HF -> GGUF: same tokens as the GGUF SmolLM2 ships as
    sample = "What is the capital of France? 1234 patients <|im_end|> naïve".encode()
    toks, meta = [], []
    for f in (gguf, embedded_gguf()):
        llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, vocab_only=True, verbose=False)
        toks.append(llm.tokenize(sample, add_bos=False, special=True))
        meta.append(dict(llm.metadata))
        llm.close()
    assert toks[0] == toks[1]
    assert meta[0]["general.file_type"] == str(int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_L))
    assert meta[0]["tokenizer.chat_template"] == hf_chat_template(smollm2_hf)
    assert "<|im_start|>" in meta[0]["tokenizer.chat_template"]
    assert meta[0]["tokenizer.ggml.pre"] == "smollm" and meta[0]["tokenizer.ggml.eos_token_id"] == "2"
    answer = generate(gguf, "What is the capital of France? Answer in one word.", n=16, chat=True)
    assert "paris" in answer.lower(), answer


@pytest.fixture(scope="module")
def smol_gap(smol_ggufs, tmp_path_factory):
    """`tools compare-quant` of the SmolLM2 f16 against its Q3_K_L on three PubMedQA contexts: windows of 64
    tokens, the first 128 tokens (the text file, the artifact folder and its results)."""
    from tests.helpers import run_tools
    from tools.paths import bundled_data

    f16, q3 = smol_ggufs
    d = tmp_path_factory.mktemp("smolgap")
    rows = [json.loads(ln) for ln in (bundled_data() / "pubmedqa" / "dev.jsonl").read_text().splitlines()[:3]]
    text = d / "text.txt"
    text.write_text("\n\n".join(" ".join(r["CONTEXTS"]) for r in rows))
    ref, quant = f16.path / f16.extra["file"], q3.path / q3.extra["file"]
    p = run_tools("compare-quant", "--ref", ref, "--quant", quant, "--text", text, "--out", d / "gap",
                  "--ctx", "64", "--max-tokens", "128", "--json", check=True)
    return text, d / "gap", json.loads(p.stdout)["results"]


@pytest.mark.slow
def test_compare_quant_gap(smol_gap, tiny_f16, tools_cli, tmp_path):
    text, gap, r = smol_gap
    assert r["tokens_scored"] == 126 and r["windows"] == 2  # two windows of 64 tokens, 63 predictions each
    assert 1.0 < r["ref"]["perplexity"] < 200 and 1.0 < r["quant"]["perplexity"] < 400
    assert 0.0 < r["mean_kl"] < 2.0 and 0.3 < r["top1_agreement"] <= 1.0
    assert (gap / "kl.png").stat().st_size > 1000
    # a reference against itself (the tiny Llama's f16: the property is the model's own): no gap at all
    ref = tiny_f16.path / tiny_f16.extra["file"]
    p = tools_cli("compare-quant", "--ref", ref, "--quant", ref, "--text", text, "--out", tmp_path / "self",
                  "--ctx", "64", "--max-tokens", "64", "--json", check=True)
    s = json.loads(p.stdout)["results"]
    assert s["tokens_scored"] == 63
    assert s["mean_kl"] < 1e-6 and s["top1_agreement"] == 1.0
    assert s["ref"]["perplexity"] == s["quant"]["perplexity"]


@pytest.mark.native
def test_compare_quant_kl_is_kl_of_ref_against_quant(smol_ggufs, smol_gap):
    """The reported mean KL is KL(ref || quant), recomputed here by plain numpy on the same tokens and windows
    (and it is not the reverse direction, which differs on these models)."""
    import numpy as np

    from tools.llamacpp import load

    f16, q3 = smol_ggufs
    text, gap, reported = smol_gap
    ref, quant = f16.path / f16.extra["file"], q3.path / q3.extra["file"]
    assert json.loads((gap / "results.json").read_text())["mean_kl"] == reported["mean_kl"]

    logp = []
    for f in (ref, quant):
        llm = load(f, n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, n_threads=1)
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"  # as compare-quant reads it
        toks = llm.tokenize(text.read_text().encode("utf-8"), add_bos=add_bos, special=False)[:128]
        per = []
        for i in range(0, len(toks), 64):  # each window on its own, as compare-quant scores them
            llm.reset()
            llm.eval(toks[i:i + 64])
            x = np.array(llm.scores[: len(toks[i:i + 64])], dtype=np.float64)[:-1]
            per.append(x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))
        logp.append(np.concatenate(per))
        llm.close()
    p, q = logp
    forward = float((np.exp(p) * (p - q)).sum(-1).clip(min=0).mean())
    backward = float((np.exp(q) * (q - p)).sum(-1).clip(min=0).mean())
    assert reported["tokens_scored"] == len(p) == 126
    assert reported["mean_kl"] == pytest.approx(forward, rel=1e-3, abs=1e-6)
    assert abs(forward - backward) > 10 * max(1e-6, 1e-3 * forward)  # the two directions are distinguishable


@pytest.mark.native
def test_imatrix_is_used(tiny_f16, tmp_path):
    """A GGUF importance matrix (llama-imatrix's format) reaches llama.cpp and changes the result."""
    import numpy as np

    from release.ggufinfo import gguf_module, read_gguf
    from release.quantize import QuantOptions, load_imatrix, quantize_stage

    f16 = tiny_f16.path / tiny_f16.extra["file"]
    g = gguf_module()
    w = g.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="imatrix")
    w.add_type("imatrix")
    rng = np.random.default_rng(0)
    for t in read_gguf(f16)["tensors"]:
        if len(t["shape"]) == 2 and t["name"] != "token_embd.weight":
            w.add_tensor(t["name"] + ".in_sum2", (rng.random((1, t["shape"][0])) * 10).astype(np.float32))
            w.add_tensor(t["name"] + ".counts", np.array([[5.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = load_imatrix(tmp_path / "imatrix.gguf")
    assert len(im) == 15 and all(v.shape == (64,) or v.shape == (128,) for v in im.values())
    a = quantize_stage(f16, "Q4_K_M", tmp_path / "with", QuantOptions(imatrix=tmp_path / "imatrix.gguf"))
    b = quantize_stage(f16, "Q4_K_M", tmp_path / "without")
    assert a.manifest["params"]["imatrix"] is True and a.extra["imatrix"] is True
    assert (a.path / a.extra["file"]).read_bytes() != (b.path / b.extra["file"]).read_bytes()
    bad = tmp_path / "imatrix.txt"
    bad.write_text("not an imatrix")
    with pytest.raises(UserError, match="imatrix"):
        quantize_stage(f16, "Q4_K_M", tmp_path / "bad", QuantOptions(imatrix=bad))
    assert not (tmp_path / "bad").exists()
