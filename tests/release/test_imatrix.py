"""tools imatrix (llama.cpp's importance matrix computed in-process through the eval callback), its use by
tools quantize (IQ3_XXS), its lineage through push, and --split-max-size (llama.cpp's gguf-split format)."""
from __future__ import annotations

import json

import pytest

from tools.artifact import Stage

NOTES = [
    "The patient is a 67-year-old man with type 2 diabetes mellitus, hypertension and chronic kidney disease "
    "stage 3 who presents with two days of dyspnea on exertion and bilateral lower extremity edema.",
    "Metformin was held because of the reduced glomerular filtration rate; insulin glargine was started at ten "
    "units nightly and titrated to a fasting glucose below 130 mg/dL.",
    "Chest radiograph showed small bilateral pleural effusions and cephalization of the pulmonary vessels, "
    "consistent with acute decompensated heart failure with preserved ejection fraction.",
    "Intravenous furosemide produced a net negative fluid balance of three liters over forty-eight hours; "
    "potassium and magnesium were repleted and creatinine remained stable.",
    "Transthoracic echocardiography demonstrated concentric left ventricular hypertrophy, an ejection fraction "
    "of 60 percent, grade II diastolic dysfunction and a dilated left atrium.",
    "He was discharged on oral torsemide, lisinopril, atorvastatin and empagliflozin with follow-up in the heart "
    "failure clinic in one week and a basic metabolic panel in three days.",
]


def write_corpus(out, *, credentialed: bool, repeat: int = 3):
    """A corpus artifact (as build-corpus writes it), marked credentialed like MIMIC text would be."""
    with Stage("corpus.test-notes", out, {"repeat": repeat, "credentialed": credentialed}) as st:
        with open(st.path("corpus.jsonl"), "w", encoding="utf-8") as f:
            for i in range(repeat):
                for j, text in enumerate(NOTES):
                    f.write(json.dumps({"id": f"n{i}-{j}", "text": text, "source": "test"}) + "\n")
        st.lineage.credentialed = credentialed
        st.lineage.sources.add("test notes")
    return st.result.path


def read_imatrix_gguf(path):
    from release.ggufinfo import gguf_module

    r = gguf_module().GGUFReader(str(path), "r")
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t.data.copy() for t in r.tensors}
    return fields, tensors


@pytest.fixture(scope="module")
def tiny_f16(tiny_llama, tmp_path_factory):
    """The tiny Llama's f16 GGUF, converted once per run for every module that asks (tests.helpers)."""
    from tests.helpers import shared_tiny_f16

    return shared_tiny_f16(tmp_path_factory, tiny_llama)


@pytest.mark.native
def test_imatrix_sums_are_the_squared_inputs_of_every_weight(tiny_f16, tmp_path):
    """Every 2-D blk weight has an entry; counts = tokens processed; q/k/v (and gate/up) see the same input; and
    block 0's attention input, recomputed in numpy from the GGUF (embedding rows -> RMS norm), matches."""
    import llama_cpp
    import numpy as np

    from release.ggufinfo import gguf_module, read_gguf
    from release.imatrix import ImatrixRun, corpus_text, imatrix_stage
    from release.quantize import load_imatrix

    corpus = write_corpus(tmp_path / "corpus", credentialed=True)
    f16 = tiny_f16.path / tiny_f16.extra["file"]
    art = imatrix_stage(tiny_f16.path, corpus, tmp_path / "imx", ImatrixRun(chunks=2, ctx=32, threads=1))
    assert art.manifest["stage"] == "imatrix" and art.lineage.credentialed is True
    assert art.extra["chunks"] == 2 and art.extra["tokens"] == 64 and art.extra["entries_short_of_tokens"] == []

    fields, tensors = read_imatrix_gguf(art.path / "imatrix.gguf")
    assert fields["general.type"] == "imatrix" and "general.architecture" not in fields
    assert fields["imatrix.chunk_count"] == 2 and fields["imatrix.chunk_size"] == 32
    assert fields["imatrix.datasets"] == ["corpus.test-notes:corpus/corpus.jsonl"]
    weights = {t["name"]: t["shape"] for t in read_gguf(f16)["tensors"]
               if t["name"].startswith("blk.") and len(t["shape"]) == 2}
    assert len(weights) == 14  # 2 layers x q, k, v, output, gate, up, down
    assert set(tensors) == {f"{w}.{k}" for w in weights for k in ("in_sum2", "counts")}
    for w, shape in weights.items():
        s, c = tensors[f"{w}.in_sum2"], tensors[f"{w}.counts"]
        assert s.shape == (1, shape[0]) and c.shape == (1, 1)  # one value per input feature (ne0)
        assert float(c[0, 0]) == 64.0  # every token of both chunks
        assert np.all(np.isfinite(s)) and np.all(s > 0)
    for layer in (0, 1):
        q = tensors[f"blk.{layer}.attn_q.weight.in_sum2"]
        for other in ("attn_k", "attn_v"):
            np.testing.assert_array_equal(q, tensors[f"blk.{layer}.{other}.weight.in_sum2"])
        np.testing.assert_array_equal(tensors[f"blk.{layer}.ffn_gate.weight.in_sum2"],
                                      tensors[f"blk.{layer}.ffn_up.weight.in_sum2"])

    # block 0's attention input from first principles
    g = gguf_module()
    r = g.GGUFReader(str(f16), "r")
    t = {x.name: x for x in r.tensors}
    emb = np.asarray(g.quants.dequantize(t["token_embd.weight"].data, t["token_embd.weight"].tensor_type), np.float32)
    norm = np.asarray(t["blk.0.attn_norm.weight"].data, np.float32)
    eps = float(r.fields["llama.attention.layer_norm_rms_epsilon"].contents())
    llm = llama_cpp.Llama(model_path=str(f16), vocab_only=True, verbose=False)
    text, _ = corpus_text(corpus)
    add_bos = bool(llm._model.add_bos_token())
    toks = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    expect = np.zeros(emb.shape[1], np.float64)
    for i in range(2):
        chunk = list(toks[i * 32:(i + 1) * 32])
        if add_bos:
            chunk[0] = llm.token_bos()
        x = emb[chunk]
        h = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * norm
        expect += (h.astype(np.float64) ** 2).sum(axis=0)
    llm.close()
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight.in_sum2"][0], expect, rtol=2e-3)

    # what llama-quantize reads: sums / counts
    im = load_imatrix(art.path / "imatrix.gguf")
    np.testing.assert_allclose(im["blk.0.attn_q.weight"], expect / 64, rtol=2e-3)


@pytest.fixture(scope="module")
def wide_f16(tiny_llama, tmp_path_factory):
    """The tiny Llama's tokenizer on a random Llama twice as wide (hidden 128, FFN 256), as an f16 GGUF: its
    ffn_down rows are 256 long, IQ3_XXS's block size, so that type really applies to them (at hidden 64 no
    row is long enough for any IQ type and llama.cpp would silently substitute every tensor)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from release.convert import Gate, convert_stage

    d = tmp_path_factory.mktemp("wide")
    shutil.copytree(tiny_llama, d / "model")
    cfg = AutoConfig.from_pretrained(d / "model")
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 128, 256, 32
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "model")
    a = convert_stage(d / "model", d / "f16", "f16", gate=Gate(tokens=0))
    return a.path / a.extra["file"]


def test_imatrix_cli_iq3_xxs_lineage_and_push(tools_cli, wide_f16, tmp_path):
    """On a tiny Llama whose ffn_down rows fit IQ3_XXS: tools imatrix writes an entry for every blk weight;
    IQ3_XXS is refused without an imatrix and made with it (the artifact or the file); the credentialed
    imatrix and the model quantized with it inherit the corpus lineage, and push refuses them."""
    from release.ggufinfo import read_gguf

    corpus = write_corpus(tmp_path / "corpus", credentialed=True)
    imx = tmp_path / "imx"
    p = tools_cli("imatrix", wide_f16, "--corpus", corpus, "--chunks", "2", "--ctx", "64", "--threads", "1",
                  "--out", imx, "--json", check=True)
    res = json.loads(p.stdout)["manifest"]["extra"]
    assert res["entries"] == 2 * 7 and res["tokens"] == 128
    _, tensors = read_imatrix_gguf(imx / "imatrix.gguf")
    weights = [t["name"] for t in read_gguf(wide_f16)["tensors"]
               if t["name"].startswith("blk.") and len(t["shape"]) == 2]
    assert len(weights) == 14 and all(f"{w}.in_sum2" in tensors for w in weights)
    assert all(float(tensors[f"{w}.counts"][0, 0]) == 128.0 for w in weights)
    assert all((tensors[f"{w}.in_sum2"] > 0).all() for w in weights)

    p = tools_cli("quantize", wide_f16, "--q", "IQ3_XXS", "--out", tmp_path / "noimx")
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr)
    assert "IQ3_XXS needs an importance matrix" in lines[0] and "tools imatrix" in lines[0]
    assert not (tmp_path / "noimx").exists()

    q = tmp_path / "iq3"
    p = tools_cli("quantize", wide_f16, "--q", "IQ3_XXS", "--imatrix", imx / "imatrix.gguf",
                  "--threads", "2", "--out", q, "--json", check=True)
    e = json.loads(p.stdout)["manifest"]["extra"]
    assert e["imatrix"] is True and e["file_type"] == "IQ3_XXS"
    assert e["tensor_types"]["IQ3_XXS"]["tensors"] == 2  # ffn_down: the rows that are multiples of 256
    man = json.loads((q / "manifest.json").read_text())
    assert man["lineage"]["credentialed"] is True  # the file inside the artifact carried its lineage
    assert any(i["kind"] == "artifact" and i["stage"] == "imatrix" for i in man["inputs"])

    for target, words in ((imx, "imatrix artifact is derived from credentialed data"), (q, "credentialed")):
        p = tools_cli("push", target, "--repo-id", "medilora/test", "--dry-run")
        assert p.returncode == 2 and "refused" in p.stderr and words in p.stderr, p.stderr


@pytest.mark.native
def test_split_max_size_shards_load_like_the_single_file(tiny_f16, tmp_path):
    """--split-max-size writes llama.cpp's gguf-split shards; llama.cpp loads the first and the logits equal
    the unsplit file's; the card lists the shards, push uploads them all."""
    import llama_cpp
    import numpy as np

    from release.ggufinfo import gguf_module, parse_size
    from release.push import plan_push
    from release.quantize import QuantOptions, quantize_stage
    from tools.ggufpath import resolve_gguf

    one = quantize_stage(tiny_f16.path, "Q8_0", tmp_path / "one", QuantOptions(threads=1))
    size = (one.path / one.extra["file"]).stat().st_size
    split = quantize_stage(tiny_f16.path, "Q8_0", tmp_path / "split", QuantOptions(threads=1, split_max_size=size // 3))
    shards = split.extra["shards"]
    stem = one.extra["file"][:-len(".gguf")]
    n = len(shards)
    assert n >= 3 and shards == [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert split.extra["file"] == shards[0] and sorted(p.name for p in split.path.glob("*.gguf")) == shards
    assert resolve_gguf(split.path).name == shards[0]
    g = gguf_module()
    total = 0
    for i, s in enumerate(shards):
        r = g.GGUFReader(str(split.path / s), "r")
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == n
        assert r.fields["split.tensors.count"].contents() == len(g.GGUFReader(str(one.path / one.extra["file"]),
                                                                              "r").tensors)
        assert ("tokenizer.chat_template" in r.fields) == (i == 0)  # metadata only in the first shard
        total += len(r.tensors)
    assert total == r.fields["split.tensors.count"].contents()

    def logits(path):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
        try:
            toks = llm.tokenize(b"The patient was given furosemide for edema.", add_bos=True)
            llm.eval(toks)
            return np.array(llm.scores[: len(toks)])
        finally:
            llm.close()

    a, b = logits(one.path / one.extra["file"]), logits(split.path / shards[0])
    assert a.shape[0] >= 5 and np.array_equal(a, b)

    plan, _ = plan_push([split.path])
    assert sorted(r for _, r in plan) == shards
    assert parse_size("2G") == 2 * 10**9 and parse_size("500M") == 5 * 10**8 and parse_size("1GiB") == 2**30
