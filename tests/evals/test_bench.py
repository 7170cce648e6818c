"""tools bench pubmedqa|medqa: extraction, loaders, the llama.cpp scorer, artifacts, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evals import extract
from tools.errors import UserError

FILES = ("results.json", "items.jsonl", "report.md", "confusion.png")


# ---- answer extraction ----------------------------------------------------------------------

@pytest.mark.parametrize("text,label,strict", [
    ("Yes.", "yes", True), ("  **No**, because", "no", True), ("maybe", "maybe", True), ("NO", "no", True),
    ("\"yes\"", "yes", True), ("The answer is no.", "no", False), ("Answer: Maybe", "maybe", False),
    ("yesterday we saw", None, False), ("I cannot tell", None, False), ("", None, False),
])
def test_pubmedqa_extraction(text, label, strict):
    p = extract.parse_pubmedqa(text)
    assert (p.label, p.strict) == (label, strict)
    assert p.decided


@pytest.mark.parametrize("text,label,strict", [
    ("(B) Refuse", "B", True), (" (d)", "D", True), ("C) x", "C", False), ("A. Aspirin", "A", False),
    ("Answer: D", "D", False), ("The answer is (C).", "C", False), ("B", "B", False),
    ("Among the options", None, False), ("(E) not an option", None, False), ("E", None, False),
    ("Option (A) is wrong; the answer is B.", "B", False),
])
def test_medqa_extraction(text, label, strict):
    p = extract.parse_medqa(text, ["A", "B", "C", "D"])
    assert (p.label, p.strict) == (label, strict)


def test_decided_only_when_more_text_cannot_change_it():
    assert not extract.parse_pubmedqa("yes", final=False).decided  # could become "yesterday"
    assert extract.parse_pubmedqa("yes,", final=False).decided
    assert not extract.parse_pubmedqa("ma", final=False).decided
    assert not extract.parse_medqa("(B", "ABCD", final=False).decided
    assert extract.parse_medqa("(B)", "ABCD", final=False).decided
    assert not extract.parse_medqa("A", "ABCD", final=False).decided  # "A." or "Among"
    assert not extract.parse_medqa("see (A) and", "ABCD", final=False).decided  # a later "answer is B" wins


def test_no_label_carried_over_between_items():
    """An unparseable answer stays None (and wrong) whatever the items before it said."""
    from evals.bench import classification_metrics
    texts = ["Yes.", "I am not sure about this", "No"]
    parsed = [extract.parse_pubmedqa(t).label for t in texts]
    assert parsed == ["yes", None, "no"]
    m = classification_metrics(["yes", "no", "maybe"], ["yes", "yes", "no"], parsed)
    assert m["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["confusion"]["matrix"][0] == [1, 0, 0, 1]  # gold yes: one right, one invalid


def test_macro_f1_matches_sklearn_definition():
    from evals.bench import classification_metrics
    gold = ["yes", "yes", "no", "maybe", "no", "yes"]
    pred = ["yes", "no", "no", "yes", None, "yes"]
    m = classification_metrics(["yes", "no", "maybe"], gold, pred)
    # yes: tp2 fp1 fn1 -> 2/3; no: tp1 fp1 fn1 -> 1/2; maybe: tp0 fn1 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3, abs=1e-5)


# ---- loaders and prompts --------------------------------------------------------------------

def test_bundled_splits_load():
    from evals.items import load_items
    pq, _ = load_items("pubmedqa", split="test")
    assert len(pq) == 500 and {i.answer for i in pq} == {"yes", "no", "maybe"}
    mq, _ = load_items("medqa", split="test")
    assert len(mq) == 1273 and all(set(i.options) == set("ABCD") for i in mq)


def test_loader_names_file_line_field(tmp_path):
    from evals.items import load_items
    f = tmp_path / "bad.jsonl"
    good = {"id": "1", "question": "Q?", "options": {"yes": "yes", "no": "no", "maybe": "maybe"}, "answer": "no"}
    f.write_text(json.dumps(good) + "\n" + json.dumps({"id": "2", "question": "Q2?", "answer": "yes"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2 \[options\]"):
        load_items("pubmedqa", f)
    f.write_text(json.dumps({**good, "answer": "perhaps"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1 \[answer\]"):
        load_items("pubmedqa", f)


def test_medqa_system_prompt_letters():
    from evals.items import system_prompt
    assert "from A to D" in system_prompt("medqa", {k: "" for k in "ABCD"})
    assert "from A to E" in system_prompt("medqa", {k: "" for k in "ABCDE"})
    assert "'yes,' 'no,' or 'maybe.'" in system_prompt("pubmedqa")


# ---- the llama.cpp scorer -------------------------------------------------------------------

@pytest.mark.native
def test_scorer_matches_a_plain_full_evaluation(smollm2_gguf):
    """Prefix reuse + one prompt pass + KV rollback give the log-likelihoods of a from-scratch
    evaluation with logits for every token (logits_all)."""
    import llama_cpp

    from tools.llm import LlamaRunner, log_softmax
    system = "You are a careful doctor."
    users = ["Is aspirin an antiplatelet drug? Answer yes or no.", "Does insulin raise blood glucose?"]
    conts_text = ["yes", "no", "(B) It depends on the dose"]
    got = []
    with LlamaRunner(smollm2_gguf, n_ctx=256, n_threads=1) as lr:
        lr.set_prefix(lr.prefix_for(system))
        prompts = [lr.render(system, u) for u in users]
        for p in prompts:
            pairs = [lr.split_continuation(p, c) for c in conts_text]
            got.append([s for s, _ in lr.score(pairs[0][0], [c for _, c in pairs])])
        toks = [[lr.split_continuation(p, c) for c in conts_text] for p in prompts]
    ref = llama_cpp.Llama(str(smollm2_gguf), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    try:
        for pi, pairs in enumerate(toks):
            for ci, (ctx, cont) in enumerate(pairs):
                ref.reset()
                ref.eval(ctx + cont)
                lp = sum(float(log_softmax(np.array(ref.scores[len(ctx) - 1 + j]))[t]) for j, t in enumerate(cont))
                assert got[pi][ci] == pytest.approx(lp, abs=2e-2), (pi, ci)
    finally:
        ref.close()
    assert len(toks[0][2][1]) > 1  # a multi-token option was part of it


# ---- the verbs ------------------------------------------------------------------------------

def _bytes(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "manifest.json"}


def test_bench_pubmedqa_generate_artifact_and_determinism(tools_cli, tmp_path):
    out = tmp_path / "pq"
    p = tools_cli("bench", "pubmedqa", "--limit", "2", "--threads", "1", "--seed", "7", "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    for f in FILES + ("lengths.png", "manifest.json"):
        assert (out / f).is_file(), f
    assert res["task"] == "pubmedqa" and res["n"] == 2 and res["mode"] == "generate"
    for key in ("accuracy", "valid_rate", "valid_rates", "macro_f1", "confusion", "sampling", "seed", "model", "data"):
        assert key in res
    assert res["sampling"]["top_k"] == 40 and res["max_tokens"] == 16
    assert len(res["model"]["sha256"]) == 64 and len(res["data"]["sha256"]) == 64
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["21645374", "16418930"]
    for r in rows:
        parsed = extract.parse_pubmedqa(r["raw"])
        assert r["parsed"] == parsed.label and r["correct"] == (parsed.label == r["gold"])
        assert r["gen_tokens"] <= 16 and len(r["prompt_sha256"]) == 64
        if r["finish"] == "decided":  # stopped early: the answer was readable from the text
            assert r["parsed"] is not None
    assert res["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 2, abs=1e-6)
    assert res["valid_rate"] == pytest.approx(sum(r["parsed"] is not None for r in rows) / 2, abs=1e-6)
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "bench.pubmedqa" and man["extra"]["timing"]["s_per_item"] > 0
    first = _bytes(out)
    again = tools_cli("bench", "pubmedqa", "--limit", "2", "--threads", "1", "--seed", "7", "--out", out)
    assert again.returncode == 0 and "up to date" in again.stderr
    p2 = tools_cli("bench", "pubmedqa", "--limit", "2", "--threads", "1", "--seed", "7", "--out", out, "--force")
    assert p2.returncode == 0, p2.stderr
    assert _bytes(out) == first  # byte-identical results, items, report and plots


def test_bench_medqa_loglik(tools_cli, tmp_path):
    out = tmp_path / "mq"
    p = tools_cli("bench", "medqa", "--mode", "loglik", "--limit", "2", "--threads", "1", "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert res["task"] == "medqa" and res["n"] == 2 and res["valid_rate"] == 1.0
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    for r in rows:
        assert set(r["loglik"]) == set("ABCD") and all(v < 0 for v in r["loglik"].values())
        assert r["pred"] == max(r["loglik"], key=r["loglik"].get)
    assert (out / "margins.png").is_file()


def test_bad_model_and_data_exit_2_without_output(tools_cli, tmp_path):
    notgguf = tmp_path / "model.gguf"
    notgguf.write_text("this is not a model\n")
    out = tmp_path / "o1"
    p = tools_cli("bench", "pubmedqa", "--model", notgguf, "--limit", "1", "--out", out)
    assert p.returncode == 2 and "not a GGUF" in p.stderr and str(notgguf) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not out.exists()
    p = tools_cli("bench", "pubmedqa", "--model", tmp_path / "missing.gguf", "--out", out)
    assert p.returncode == 2 and "not found" in p.stderr and not out.exists()
    bad = tmp_path / "items.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q", "options": {"A": "a", "B": "b"}}) + "\n")
    p = tools_cli("bench", "medqa", "--data", bad, "--out", out)
    assert p.returncode == 2 and f"{bad}:1 [answer]" in p.stderr and not out.exists()
    assert not list(tmp_path.glob(".o1.partial-*"))


@pytest.mark.native
def test_rag_context_goes_into_the_prompt(tmp_path, smollm2_gguf):
    """--rag: retrieved chunks (ids, scores) are recorded per item and change the prompt."""
    rag = pytest.importorskip("evals.rag", reason="evals.rag is written by the RAG package")
    from evals.bench import run_bench
    from tools.artifact import Stage
    from tools.io import write_jsonl

    corpus = tmp_path / "corpus"
    with Stage("corpus.test", corpus, {}) as st:
        write_jsonl(st.path("corpus.jsonl"), [
            {"id": "d1", "text": "Mitochondria change shape and lose membrane potential during programmed cell "
                                 "death in lace plant leaves.", "source": "test"},
            {"id": "d2", "text": "Anal pull-through procedures for Hirschsprung disease have good long-term "
                                 "bowel function.", "source": "test"}])
    idx = rag.build_index(corpus, tmp_path / "index", chunk_tokens=64, overlap=8)
    art = run_bench("pubmedqa", mode="loglik", limit=1, threads=1, out=tmp_path / "rag", rag=idx.path, k=2,
                    plots=False)
    row = json.loads((art.path / "items.jsonl").read_text().splitlines()[0])
    from evals.items import load_items, system_prompt, user_message
    from tools.llm import LlamaRunner
    item = load_items("pubmedqa", limit=1)[0][0]
    with LlamaRunner(smollm2_gguf, n_ctx=2048, n_threads=1) as lr:
        plain_prompt = lr.render(system_prompt("pubmedqa"), user_message("pubmedqa", item))
        plain = {"prompt_tokens": len(lr.tokenize(plain_prompt))}
    assert [c["id"] for c in row["chunks"]][:1] and row["chunks"][0]["id"].startswith("d1")
    assert all(isinstance(c["score"], float) for c in row["chunks"])
    assert row["prompt_tokens"] > plain["prompt_tokens"] + 10
    assert row["prompt_sha256"] != __import__("tools.io", fromlist=["x"]).sha256_bytes(plain_prompt)
    res = json.loads((art.path / "results.json").read_text())
    assert res["rag"] == {"index": str(idx.path), "k": 2}
