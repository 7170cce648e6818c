"""Semantic metrics on tiny local models: an exact answer ranks above an unrelated one."""
from __future__ import annotations

import json
import random

import pytest

from tools.artifact import Stage, read_artifact
from tools.errors import UserError

REFS = ["thiazide diuretics are a first-line treatment for hypertension",
        "give intravenous fluids and insulin in diabetic ketoacidosis",
        "nebulised salbutamol relieves acute asthma",
        "appendicitis pain migrates to the right iliac fossa"]
UNRELATED = ["the football match ended in a draw on saturday",
             "the train to the coast leaves at noon",
             "a sunny afternoon in the park with friends",
             "the bakery sells fresh bread every morning"]
WORDS = sorted({w for s in REFS + UNRELATED for w in s.split()})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT with a WordPiece tokenizer trained here (a real HF folder, no Hub)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator((REFS + UNRELATED) * 3, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tk.decoder = decoders.WordPiece()
    tok = BertTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    """An NLI classifier trained here: the packaged MiniLM encoder (frozen) + a 3-way head fitted on
    (same sentence -> entailment, random other sentence -> contradiction). The labels are stored in a
    non-MNLI order (entailment first) so that a metric that assumed MNLI's index would fail."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from tools.paths import embedded_embedder

    out = tmp_path_factory.mktemp("tiny-nli")
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(str(embedded_embedder()))
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(embedded_embedder()), num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()}).eval()

    def rand_sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))

    a = [rand_sentence() for _ in range(128)]
    b = [x if i % 2 == 0 else rand_sentence() for i, x in enumerate(a)]
    y = torch.tensor([0 if i % 2 == 0 else 2 for i in range(len(a))])
    with torch.no_grad():
        feats = model.bert(**tok(a, b, padding=True, return_tensors="pt")).pooler_output
    opt = torch.optim.AdamW(model.classifier.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model.classifier(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _pairs():
    exact = [{"id": f"e{i}", "prediction": r, "reference": r} for i, r in enumerate(REFS)]
    unrel = [{"id": f"u{i}", "prediction": u, "reference": r} for i, (u, r) in enumerate(zip(UNRELATED, REFS))]
    return exact, unrel


def test_metrics_rank_exact_answer_above_unrelated(tiny_bert, tiny_nli):
    from evals.semantic import score_pairs

    exact, unrel = _pairs()
    res = score_pairs(exact + unrel, bertscore_model=str(tiny_bert), semscore_model=str(tiny_bert),
                      nli_model=str(tiny_nli))
    assert res["skipped"] == {}
    items = {it["id"]: it for it in res["items"]}
    for m in ("bertscore_f1", "semscore", "nli_entailment"):
        assert res["metrics"][m]["model_path"] in (str(tiny_bert), str(tiny_nli))
        assert len(res["metrics"][m]["model_sha256"]) == 64
        for i in range(len(REFS)):
            assert items[f"e{i}"][m] > items[f"u{i}"][m], (m, items[f"e{i}"], items[f"u{i}"])
    for i in range(len(REFS)):
        assert items[f"e{i}"]["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)
        assert items[f"e{i}"]["semscore"] == pytest.approx(1.0, abs=1e-4)
    ent_exact = sum(items[f"e{i}"]["nli_entailment"] for i in range(len(REFS))) / len(REFS)
    ent_unrel = sum(items[f"u{i}"]["nli_entailment"] for i in range(len(REFS))) / len(REFS)
    assert ent_exact > 0.5 > ent_unrel, (ent_exact, ent_unrel)
    assert res["metrics"]["nli_entailment"]["label"] == "entailment"
    assert res["metrics"]["bertscore_f1"]["layer"] == 2, "a model bert-score does not know: its last layer"
    n = len(res["items"])
    assert res["metrics"]["semscore"]["mean"] == pytest.approx(sum(it["semscore"] for it in res["items"]) / n, abs=1e-5)


def test_bertscore_is_f1_of_bert_score_itself(tiny_bert):
    """On pairs of different lengths precision, recall and F1 differ: ours must be bert_score's F1."""
    from bert_score import score

    from evals.semantic import bertscore_f1

    preds = ["thiazide diuretics", "give fluids and insulin in diabetic ketoacidosis now please"]
    refs = ["thiazide diuretics are a first-line treatment for hypertension", "give intravenous fluids"]
    ours, info = bertscore_f1(preds, refs, tiny_bert)
    p, r, f = score(preds, refs, model_type=str(tiny_bert), num_layers=info["layer"], device="cpu")
    assert ours == pytest.approx([float(x) for x in f], abs=1e-5)
    for i in range(2):
        assert abs(float(p[i]) - float(f[i])) > 1e-3 and abs(float(r[i]) - float(f[i])) > 1e-3


def test_semscore_with_packaged_minilm_prefers_a_paraphrase():
    from evals.semantic import semscore
    from tools.paths import embedded_embedder

    ref = "The patient has high blood pressure."
    vals, _ = semscore(["The patient is hypertensive.", "The football match ended in a draw."], [ref, ref],
                       embedded_embedder())
    assert vals[0] > vals[1] + 0.2, vals


def test_nli_model_without_entailment_label_is_refused(tiny_nli, tmp_path):
    import shutil

    from evals.semantic import nli_entailment

    bad = tmp_path / "bad-nli"
    shutil.copytree(tiny_nli, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["id2label"] = {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    cfg["label2id"] = {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config.json \[id2label\]"):
        nli_entailment(["a"], ["a"], bad)


def test_cli_on_a_results_folder_names_models_and_skips_with_reason(tmp_path, tools_cli):
    """Defaults offline (empty HF cache): BERTScore and SemScore fall back to the packaged MiniLM and say
    so; NLI says why it is skipped unless a local classifier is given."""
    exact, unrel = _pairs()
    res_dir = tmp_path / "bench-x"
    with Stage("bench.test", res_dir, {}) as st:
        with open(st.path("items.jsonl"), "w") as f:
            for p in exact + unrel:
                f.write(json.dumps({"id": p["id"], "raw_output": p["prediction"], "long_answer": p["reference"],
                                    "correct": True}) + "\n")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}
    p = tools_cli("eval", "semantic", res_dir, "--json", env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert res["n"] == 8
    for m in ("bertscore_f1", "semscore"):
        assert res["metrics"][m]["model"] == "all-MiniLM-L6-v2 (packaged)"
        assert "not available offline" in res["metrics"][m]["note"]
    assert "nli_entailment" not in res["metrics"] and "roberta-large-mnli" in res["skipped"]["nli_entailment"]
    out = tmp_path / "bench-x-semantic"
    art = read_artifact(out, stage="eval.semantic")
    assert {"items.jsonl", "results.json", "report.md", "semantic.png"} <= set(art.outputs())
    assert (out / "semantic.png").read_bytes()[:4] == b"\x89PNG"
    assert "skipped" in (out / "report.md").read_text()
    items = {json.loads(line)["id"]: json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()}
    for i in range(len(REFS)):
        assert items[f"e{i}"]["bertscore_f1"] > items[f"u{i}"]["bertscore_f1"]
        assert items[f"e{i}"]["nli_entailment"] is None


def test_pred_ref_files_and_bad_input(tmp_path, tools_cli, tiny_bert, tiny_nli):
    from evals.semantic import evaluate, load_pairs

    pred = tmp_path / "pred.jsonl"
    ref = tmp_path / "ref.jsonl"
    pred.write_text("".join(json.dumps({"id": f"q{i}", "prediction": r}) + "\n" for i, r in enumerate(REFS)))
    ref.write_text("".join(json.dumps({"id": f"q{i}", "reference": r}) + "\n" for i, r in reversed(list(enumerate(REFS)))))
    pairs = load_pairs(pred=pred, ref=ref)
    assert all(p["prediction"] == p["reference"] for p in pairs), "joined on id, not on line"
    art = evaluate(tmp_path / "sem", pred=pred, ref=ref, bertscore_model=str(tiny_bert), semscore_model="none",
                   nli_model=str(tiny_nli))
    assert art.extra["skipped"] == {"semscore": "disabled (--semscore-model none)"}
    assert art.extra["means"]["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)
    first = (tmp_path / "sem" / "items.jsonl").read_bytes()
    evaluate(tmp_path / "sem", pred=pred, ref=ref, bertscore_model=str(tiny_bert), semscore_model="none",
             nli_model=str(tiny_nli), force=True)
    assert (tmp_path / "sem" / "items.jsonl").read_bytes() == first, "same inputs, same bytes"

    # an id without a reference: file and line named, exit 2, nothing written
    pred.write_text(pred.read_text() + json.dumps({"id": "q9", "prediction": "x"}) + "\n")
    p = tools_cli("eval", "semantic", "--pred", pred, "--ref", ref, "--out", tmp_path / "bad")
    assert p.returncode == 2 and f"{pred}:5" in p.stderr and "q9" in p.stderr
    assert p.stderr.strip().count("\n") == 0 and not (tmp_path / "bad").exists()
    # text files are joined line by line and must have as many lines
    (tmp_path / "p.txt").write_text("a\nb\n")
    (tmp_path / "r.txt").write_text("a\n")
    p = tools_cli("eval", "semantic", "--pred", tmp_path / "p.txt", "--ref", tmp_path / "r.txt")
    assert p.returncode == 2 and "2 predictions but 1 references" in p.stderr
    p = tools_cli("eval", "semantic")
    assert p.returncode == 2 and "RESULTS_DIR" in p.stderr
