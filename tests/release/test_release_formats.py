"""Release formats: several quant types + table, the HF-vs-GGUF fidelity gate, a LoRA adapter as GGUF."""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

from tests.helpers import run_tools
from tools.errors import WorkError


@pytest.fixture(scope="module")
def sharp_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with large random weights: peaked next-token distributions, so a wrong rope
    setting shows (with the default init every distribution is near uniform and any model passes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("sharp") / "model"
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in n else 0.25)
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(d)
    shutil.copy(tiny_llama / "tokenizer.model", d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def sharp_f16(sharp_llama, tmp_path_factory):
    from release.convert import convert_stage

    return convert_stage(sharp_llama, tmp_path_factory.mktemp("sharpf16") / "gguf", "f16", name="MediLoRA Tiny Test")


def test_convert_records_fidelity_and_names_the_model(sharp_f16):
    from release.ggufinfo import read_gguf

    fid = sharp_f16.extra["fidelity"]
    assert fid["tokens_scored"] >= 200 and fid["tokens_match"] is True
    assert fid["mean_kl"] < 1e-3 and fid["top1_agreement"] > 0.97
    meta = read_gguf(sharp_f16.path / sharp_f16.extra["file"], tensors=False)["metadata"]
    assert meta["general.name"] == "MediLoRA Tiny Test" and meta["general.basename"] == "MediLoRA-Tiny-Test"
    assert sharp_f16.extra["file"].startswith("MediLoRA-Tiny-Test-") and sharp_f16.extra["file"].endswith("-F16.gguf")


def test_fidelity_gate_fails_a_broken_conversion(sharp_llama, tmp_path, monkeypatch):
    """The converter sees a wrong rope_theta (as a broken config or converter would): convert fails with the
    numbers and writes nothing."""
    import release.convert as rc

    broken = tmp_path / "broken"
    shutil.copytree(sharp_llama, broken)
    cfg = json.loads((broken / "config.json").read_text())
    if "rope_parameters" in cfg:
        cfg["rope_parameters"]["rope_theta"] = 10.0
    else:
        cfg["rope_theta"] = 10.0
    (broken / "config.json").write_text(json.dumps(cfg))
    real = rc.convert_hf_to_gguf
    monkeypatch.setattr(rc, "convert_hf_to_gguf", lambda model_dir, *a, **k: real(broken, *a, **k))
    with pytest.raises(WorkError, match=r"fidelity gate: .* mean KL\(HF \|\| GGUF\) [0-9.e+-]+ nats > 0.01; "
                                        r"top-1 agreement [0-9.]+% < 90%"):
        rc.convert_stage(sharp_llama, tmp_path / "out", "f16")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def quant_set(sharp_f16, tmp_path_factory):
    """``tools quantize F16 --q Q4_K_M,Q8_0``: the set's folder and its manifest's ``extra``."""
    out = tmp_path_factory.mktemp("qset") / "set"
    p = run_tools("quantize", sharp_f16.path, "--q", "Q4_K_M,Q8_0", "--out", out, "--max-tokens", "128", "--json",
                  check=True)
    return out, json.loads(p.stdout)["manifest"]["extra"]


def _own_perplexity(gguf, text: str, n_tokens: int) -> float:
    """Perplexity of ``gguf`` on the first ``n_tokens`` tokens of ``text``, from its own logits, computed here
    (llama.cpp logits, a log-softmax by hand) rather than by release.quantgap."""
    import numpy as np

    from release.ggufinfo import read_gguf
    from tools.llamacpp import load

    bos = bool(read_gguf(gguf, tensors=False)["metadata"].get("tokenizer.ggml.add_bos_token", True))
    llm = load(gguf, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, n_threads=1, n_threads_batch=1)
    try:
        toks = llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)[:n_tokens]
        llm.eval(toks)
        z = np.array(llm.scores[: len(toks)], dtype=np.float64)
    finally:
        llm.close()
    logz = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    nll = [logz[i] - z[i, toks[i + 1]] for i in range(len(toks) - 1)]
    return math.exp(sum(nll) / len(nll))


def test_quant_table_perplexity_is_each_types_own(quant_set):
    """(4) the quant table's perplexity of a type is computed from that type's logits: Q4_K_M's, recomputed
    here from the Q4_K_M file on the same 128 held-out tokens, is the table's, and is not the F16 source's."""
    out, _ = quant_set
    rows = {r["type"]: r for r in json.loads((out / "quant-table.json").read_text())["rows"]}
    text = (out / "heldout.txt").read_text(encoding="utf-8")
    q4 = rows["Q4_K_M"]
    own = _own_perplexity(out / q4["file"], text, 128)
    assert q4["perplexity"] == pytest.approx(own, rel=1e-4)
    assert abs(q4["perplexity"] / q4["ref_perplexity"] - 1) > 1e-3  # a sharp model: Q4_K_M is measurably off
    md_row = next(ln for ln in (out / "quant-table.md").read_text().splitlines() if ln.startswith("| Q4_K_M |"))
    assert f"| {q4['perplexity']:.3f} |" in md_row


def test_several_quant_types_write_one_file_each(quant_set):
    """Several quant types writing one: each type's file is its own (distinct sha256, the GGUF's own file
    type), and each table row names that file and its size on disk."""
    from release.ggufinfo import read_gguf

    out, res = quant_set
    rows = json.loads((out / "quant-table.json").read_text())["rows"]
    assert [r["type"] for r in rows] == res["types"] == ["Q4_K_M", "Q8_0"]
    shas = set()
    for r in rows:
        f = out / r["file"]
        assert f.parent.name == r["type"] and f.name.endswith(f"-{r['type']}.gguf"), r["file"]
        assert r["size_bytes"] == f.stat().st_size
        assert read_gguf(f, tensors=False)["file_type"].upper().startswith(r["type"]), r["type"]
        shas.add(hashlib.sha256(f.read_bytes()).hexdigest())
    assert len(shas) == len(rows) == len(res["files"]) == 2
    assert res["files"] == [r["file"] for r in rows]


def test_several_quant_types_one_call_table_card_push(tools_cli, quant_set, tmp_path):
    out, res = quant_set
    assert res["types"] == ["Q4_K_M", "Q8_0"]
    for q in ("Q4_K_M", "Q8_0"):
        files = list((out / q).glob("*.gguf"))
        assert len(files) == 1 and files[0].name.endswith(f"-{q}.gguf"), files
    table = json.loads((out / "quant-table.json").read_text())
    rows = {r["type"]: r for r in table["rows"]}
    assert table["tokens_scored"] == 127
    for r in rows.values():
        assert r["size_bytes"] > 0 and r["bits_per_weight"] > 0 and r["tensor_mix"]
        assert r["perplexity"] > 1 and r["mean_kl"] >= 0 and 0 < r["top1_agreement"] <= 1
    assert rows["Q8_0"]["mean_kl"] < rows["Q4_K_M"]["mean_kl"]
    assert rows["Q8_0"]["size_bytes"] > rows["Q4_K_M"]["size_bytes"]
    md = (out / "quant-table.md").read_text()
    assert "| Q4_K_M |" in md and "| Q8_0 |" in md and "mean KL" in md

    card = tmp_path / "card"
    tools_cli("card", out, "--repo-id", "medilora/tiny-test", "--out", card, check=True)
    text = (card / "README.md").read_text()
    for q in ("Q4_K_M", "Q8_0"):
        assert f"-{q}.gguf" in text
    assert "## Quantization types" in text and "| Q8_0 |" in text
    assert str(tmp_path) not in text and "/tmp/" not in text
    p = tools_cli("push", out, card, "--repo-id", "medilora/tiny-test", "--dry-run", "--json", check=True)
    pushed = sorted(f["path"] for f in json.loads(p.stdout)["results"]["files"])
    assert [f for f in pushed if f.endswith(".gguf")] == sorted(f.split("/")[-1] for f in res["files"])


def test_card_traces_base_model_to_the_hub_id(tmp_path, smollm2_gguf):
    """train (base_model: a local merge) -> merge -> hf-from-gguf of the embedded SmolLM2: the card names
    HuggingFaceTB/SmolLM2-135M-Instruct and no local path; eval data is listed apart from training data."""
    from release.card import EMBEDDED_HUB_ID, build_card
    from tools.artifact import Stage

    with Stage("hf-from-gguf", tmp_path / "base", {"gguf": smollm2_gguf.name}, inputs=[smollm2_gguf]) as st:
        st.path("config.json").write_text("{}")
        st.lineage.sources.add(f"SmolLM2 GGUF {smollm2_gguf.name}")
    with Stage("merge", tmp_path / "merge1", {}, inputs=[tmp_path / "base"]) as st:
        st.path("config.json").write_text("{}")
        st.extra["base_model"] = str(tmp_path / "base")
    with Stage("train", tmp_path / "train2", {}, inputs=[tmp_path / "merge1"]) as st:
        st.path("adapter_config.json").write_text("{}")
        st.lineage.sources.add("PubMedQA (train)")
        st.extra["base_model"] = str(tmp_path / "merge1")
    with Stage("bench.pubmedqa", tmp_path / "bench", {}) as st:
        st.path("results.json").write_text(json.dumps({"task": "pubmedqa", "accuracy": 0.5, "n": 4}))
        st.lineage.sources.add("pubmedqa (test.jsonl)")
    art = build_card([tmp_path / "train2", tmp_path / "bench"], tmp_path / "card")
    text = (art.path / "README.md").read_text()
    assert f"base_model: {EMBEDDED_HUB_ID}" in text and "base_model_relation: adapter" in text
    assert str(tmp_path) not in text
    train_line = next(ln for ln in text.splitlines() if ln.startswith("- Training data:"))
    eval_line = next(ln for ln in text.splitlines() if ln.startswith("- Evaluation data"))
    assert "PubMedQA (train)" in train_line and "test.jsonl" not in train_line
    assert "pubmedqa (test.jsonl)" in eval_line


@pytest.mark.native
def test_lora_gguf_answers_like_the_merged_gguf(tiny_llama, tmp_path_factory, tmp_path):
    from evals.bench import run_bench
    from release.convert import Gate, convert_lora_stage, convert_stage
    from release.merge import merge_peft
    from tests.helpers import make_adapter, shared_tiny_f16

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    merged = merge_peft(tiny_llama, adapter, tmp_path / "merged").path
    base_g = shared_tiny_f16(tmp_path_factory, tiny_llama)  # the base's f16, converted once per run
    merged_g = convert_stage(merged, tmp_path / "merged-f16", "f16", gate=Gate(tokens=0))
    lora = convert_lora_stage(adapter, tiny_llama, tmp_path / "lora", "f16", name="MediLoRA Tiny Adapter")
    assert lora.manifest["stage"] == "gguf.lora" and lora.extra["file"] == "MediLoRA-Tiny-Adapter-LoRA-F16.gguf"
    assert lora.extra["lora_alpha"] == 8
    kw = dict(mode="loglik", limit=6, n_ctx=1024, threads=1, plots=False)
    a = run_bench("pubmedqa", model=base_g.path, lora=lora.path, out=tmp_path / "b-lora", **kw)
    b = run_bench("pubmedqa", model=merged_g.path, out=tmp_path / "b-merged", **kw)
    c = run_bench("pubmedqa", model=base_g.path, out=tmp_path / "b-base", **kw)
    rows = [[json.loads(ln) for ln in (x.path / "items.jsonl").read_text().splitlines()] for x in (a, b, c)]
    diffs, base_diffs = [], []
    for ra, rb, rc_ in zip(*rows):
        assert ra["pred"] == rb["pred"]
        for lab in ra["loglik"]:
            diffs.append(abs(ra["loglik"][lab] - rb["loglik"][lab]))
            base_diffs.append(abs(rc_["loglik"][lab] - rb["loglik"][lab]))
    assert max(diffs) < 0.02, max(diffs)          # runtime adapter == merged weights (f16 rounding only)
    assert max(base_diffs) > 10 * max(diffs)      # and the adapter really changes the model


def test_report_includes_the_quant_table_and_the_modelfile(tools_cli, tmp_path):
    """The demo's report step appends quants/quant-table.md (as Markdown) and ollama/Modelfile (fenced)."""
    from tests.helpers import fake_bench

    gold = ["yes", "no", "yes", "maybe"] * 3
    a = fake_bench(tmp_path, "base", [i % 2 == 0 for i in range(12)], gold)
    b = fake_bench(tmp_path, "tuned", [i % 3 != 0 for i in range(12)], gold)
    (tmp_path / "quants").mkdir()
    (tmp_path / "quants" / "quant-table.md").write_text("| type | file |\n|---|---|\n| Q8_0 | `m-Q8_0.gguf` |\n")
    (tmp_path / "ollama").mkdir()
    (tmp_path / "ollama" / "Modelfile").write_text("FROM ./m-Q3_K_L.gguf\nPARAMETER top_k 40\n")
    p = tools_cli("report", a, b, "--include", tmp_path / "quants" / "quant-table.md",
                  "--include", tmp_path / "ollama" / "Modelfile", "--out", tmp_path / "rep")
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## quants/quant-table.md\n\n| type | file |\n|---|---|\n| Q8_0 | `m-Q8_0.gguf` |" in md
    assert "## ollama/Modelfile\n\n```\nFROM ./m-Q3_K_L.gguf\nPARAMETER top_k 40\n```" in md
    assert md.index("## Paired tests") < md.index("## quants/quant-table.md") < md.index("## ollama/Modelfile")
    p = tools_cli("report", a, b, "--include", tmp_path / "missing.md", "--out", tmp_path / "rep2")
    assert p.returncode == 2 and not (tmp_path / "rep2").exists()
