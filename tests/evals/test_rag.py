"""Retrieval: index a corpus with the packaged MiniLM, retrieve the answering chunk, fit a small window."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from tools.artifact import Lineage, Stage, read_artifact
from tools.errors import UserError

DOCS = [
    ("htn", "guidelines",
     "Hypertension management. Lifestyle changes such as salt restriction, weight loss and exercise are advised "
     "for every patient with raised blood pressure. For uncomplicated stage 1 hypertension, thiazide diuretics "
     "are a recommended first-line drug treatment, together with ACE inhibitors, angiotensin receptor blockers and "
     "calcium channel blockers. Blood pressure should be rechecked within one month of starting treatment."),
    ("dka", "textbook",
     "Diabetic ketoacidosis presents with hyperglycaemia, ketonaemia and metabolic acidosis. Treatment starts "
     "with intravenous fluids, then a fixed-rate intravenous insulin infusion, and careful potassium replacement "
     "because insulin drives potassium into cells."),
    ("asthma", "textbook",
     "In acute severe asthma, give high-flow oxygen, nebulised salbutamol and ipratropium, and oral prednisolone. "
     "Magnesium sulfate may be given intravenously when the response to bronchodilators is poor."),
    ("appendix", "textbook",
     "Appendicitis classically begins with periumbilical pain that migrates to the right iliac fossa, with "
     "anorexia, nausea and low-grade fever. Laparoscopic appendicectomy is the usual treatment."),
    ("blank", "textbook", "   "),
]


def make_corpus(out, docs=DOCS, credentialed=True):
    with Stage("corpus.test", out, {"docs": len(docs)}) as st:
        st.lineage.merge(Lineage(credentialed=credentialed, licenses={"CC-BY-4.0"}))
        with open(st.path("corpus.jsonl"), "w", encoding="utf-8") as f:
            for did, src, text in docs:
                f.write(json.dumps({"id": did, "source": src, "text": text}) + "\n")
    return out


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, ):
    """Built through the console script, as a user would (also proves `tools rag index` works)."""
    from tests.helpers import run_tools

    base = tmp_path_factory.mktemp("rag")
    corpus = make_corpus(base / "corpus")
    out = base / "index"
    p = run_tools("rag", "index", "--corpus", corpus, "--chunk-tokens", "24", "--overlap", "6", "--out", out, "--json",
                  check=True, timeout=600)
    summary = json.loads(p.stdout)["manifest"]["extra"]
    assert summary["n_docs"] == 4, "the blank document is not indexed"
    return out


@pytest.fixture(scope="module")
def retriever(index_dir):
    from evals.rag import Retriever
    return Retriever(index_dir)


def test_index_is_chunked_with_overlap_and_carries_lineage(index_dir):
    art = read_artifact(index_dir, stage="rag.index")
    assert art.lineage.credentialed is True and "CC-BY-4.0" in art.lineage.licenses
    chunks = [json.loads(line) for line in (index_dir / "chunks.jsonl").read_text().splitlines()]
    assert art.extra["n_chunks"] == len(chunks) > 4, "long documents are split into several chunks"
    assert all(c["tokens"] <= 24 for c in chunks)
    htn = [c for c in chunks if c["doc_id"] == "htn"]
    assert len(htn) >= 3
    text = DOCS[0][2]
    for a, b in zip(htn, htn[1:]):
        assert text[a["start"]:a["end"]] == a["text"]
        assert b["start"] < a["end"], "consecutive chunks overlap"
    assert htn[-1]["end"] == len(text.rstrip())
    emb = json.loads((index_dir / "embedder.json").read_text())
    assert emb["dim"] == 384 and emb["normalized"] is True


def test_retrieves_the_answering_chunk(retriever):
    hits = retriever.search("What is the first-line drug treatment for stage 1 hypertension?", k=3)
    assert len(hits) == 3
    assert set(hits[0]) >= {"id", "text", "score", "source"}
    assert hits[0]["doc_id"] == "htn" and "thiazide" in hits[0]["text"], hits[0]
    assert hits[0]["source"] == "guidelines"
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert 0.0 < hits[0]["score"] <= 1.0001, "cosine of unit vectors"
    dka = retriever.search("insulin infusion and potassium in ketoacidosis", k=1)[0]
    assert dka["doc_id"] == "dka"
    assert len(retriever.search("asthma", k=1000)) == retriever.index.ntotal, "k is capped at the index size"
    with pytest.raises(UserError):
        retriever.search("asthma", k=0)


def test_same_inputs_same_index_bytes(index_dir, tmp_path):
    from evals.rag import build_index

    corpus = make_corpus(tmp_path / "corpus")
    art = build_index(corpus, tmp_path / "again", chunk_tokens=24, overlap=6)
    ref = read_artifact(index_dir)
    assert sorted((o["path"], o["sha256"]) for o in art.manifest["outputs"]) == \
        sorted((o["path"], o["sha256"]) for o in ref.manifest["outputs"])
    again = build_index(corpus, tmp_path / "again", chunk_tokens=24, overlap=6)
    assert again.manifest["finished"] == art.manifest["finished"], "identical inputs: nothing re-done"


def test_fit_context_keeps_system_and_question_in_a_small_window(retriever, smollm2_gguf):
    """The LoRAG spillover bug: a naive prompt overflows a 192-token window; ours keeps the question."""
    import llama_cpp

    from evals.rag import fit_context

    llm = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    try:
        def count(s: str) -> int:
            return len(llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)) if s else 0

        def prompt(system, context, question):
            return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{context}\n\n{question}<|im_end|>\n"
                    "<|im_start|>assistant\n")

        system = "You are a careful medical assistant. Answer yes, no or maybe, then explain briefly."
        question = ("Question: In a patient with uncomplicated stage 1 hypertension, are thiazide diuretics an "
                    "appropriate first-line drug treatment?")
        hits = retriever.search(question, k=8)
        n_ctx, answer = 192, 32
        overhead = count(prompt("", "", ""))
        naive = prompt(system, "\n\n".join(h["text"] for h in hits), question)
        assert count(naive) + answer > n_ctx, "the test must need cutting"
        # additive budget (template tokens and a little slack in the answer room) ...
        ctx_a, kept_a = fit_context(system, question, hits, count, n_ctx, answer + overhead + 4)
        assert count(prompt(system, ctx_a, question)) + answer <= n_ctx
        # ... or exact, on the rendered prompt
        ctx, kept = fit_context(system, question, hits, count, n_ctx, answer,
                                render=lambda c: prompt(system, c, question))
        assert len(ctx) >= len(ctx_a)
        final = prompt(system, ctx, question)
        assert count(final) + answer <= n_ctx
        assert system in final and question in final, "system prompt and question are never cut"
        assert 0 < len(kept) < len(hits), "some context kept, some dropped"
        assert [k["id"] for k in kept] == [h["id"] for h in hits[:len(kept)]], "cut in rank order"
        assert all(not k["truncated"] for k in kept[:-1])
        assert kept[-1]["truncated"] and hits[len(kept) - 1]["text"].startswith(kept[-1]["text"]), \
            "the last chunk is cut within, keeping its beginning"
        # the room freed by the cut is used: one more word of the cut chunk would not fit
        full = hits[len(kept) - 1]["text"]
        longer = full[:len(kept[-1]["text"]) + 1 + full[len(kept[-1]["text"]) + 1:].find(" ") + 1]
        more = "\n\n".join([k["text"] for k in kept[:-1]] + [longer.rstrip()])
        assert count(prompt(system, more, question)) + answer > n_ctx
        # a window too small for the question itself: no context, the question is still whole
        ctx2, kept2 = fit_context(system, question, hits, count, 40, answer + overhead)
        assert ctx2 == "" and kept2 == []
        ctx3, kept3 = fit_context(system, question, hits, count, 60, answer, render=lambda c: prompt(system, c, question))
        assert ctx3 == "" and kept3 == []
    finally:
        llm.close()


def test_fit_context_is_exact_and_maximal_for_any_window():
    from evals.rag import fit_context

    def count(s):
        return len(s.split())

    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    chunks = [{"id": str(i), "text": " ".join(rng.sample(words, rng.randint(3, 30))), "source": "s", "score": 1.0}
              for i in range(6)]
    system, question = "sys tem prompt", "the question is here ?"
    total = sum(count(c["text"]) for c in chunks)
    for n_ctx in range(5, total + 20):
        ctx, kept = fit_context(system, question, chunks, count, n_ctx, 3)
        used = count(system) + count(question) + 3
        assert used + count(ctx) <= n_ctx or (ctx == "" and used > n_ctx)
        if used < n_ctx and len(kept) < len(chunks) + 0:
            free = n_ctx - used - count(ctx)
            assert free == 0 or total == count(ctx), f"n_ctx={n_ctx}: {free} tokens left unused"
        assert ctx == "\n\n".join(k["text"] for k in kept)


def test_empty_corpus_is_one_clear_line(tmp_path, tools_cli):
    corpus = tmp_path / "empty"
    with Stage("corpus.test", corpus, {}) as st:
        st.path("corpus.jsonl").write_text("")
    p = tools_cli("rag", "index", "--corpus", corpus, "--out", tmp_path / "idx")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "corpus.jsonl" in p.stderr and "empty" in p.stderr
    assert not (tmp_path / "idx").exists()
    blank = make_corpus(tmp_path / "blank", docs=[("a", "s", " "), ("b", "s", "\n")])
    p = tools_cli("rag", "index", "--corpus", blank, "--out", tmp_path / "idx")
    assert p.returncode == 2 and "no document with text" in p.stderr and p.stderr.strip().count("\n") == 0
    p = tools_cli("rag", "index", "--corpus", tmp_path / "nope", "--out", tmp_path / "idx")
    assert p.returncode == 2 and "not found" in p.stderr


def test_query_with_another_embedder_is_refused(index_dir, tmp_path, tools_cli):
    from tools.paths import embedded_embedder

    other = tmp_path / "other-embedder"
    shutil.copytree(embedded_embedder(), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5  # a different model by content
    (other / "config.json").write_text(json.dumps(cfg))
    p = tools_cli("rag", "query", index_dir, "hypertension", "--embedder", other)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and "index was built with embedder" in line and str(index_dir) in line
    # the same model under another path is accepted (identity is the content, not the path); in-process
    from evals.rag import Retriever

    same = tmp_path / "same-embedder"
    shutil.copytree(embedded_embedder(), same)
    hits = Retriever(index_dir, embedder=same).search("What is the first-line drug treatment for stage 1 hypertension?", 2)
    assert [h["rank"] for h in hits] == [0, 1] and hits[0]["doc_id"] == "htn"
    with pytest.raises(UserError, match="index was built with embedder"):
        Retriever(index_dir, embedder=other)


def test_query_success_path_through_the_cli(index_dir, tools_cli):
    p = tools_cli("rag", "query", index_dir, "What is the first-line drug treatment for stage 1 hypertension?",
                  "--k", "2", "--json", check=True)
    hits = json.loads(p.stdout)["results"]
    assert [h["rank"] for h in hits] == [0, 1]
    assert hits[0]["doc_id"] == "htn" and "thiazide" in hits[0]["text"]
    assert hits[0]["score"] >= hits[1]["score"]


@pytest.mark.native
def test_bench_rag_puts_the_retrieved_text_in_the_prompt(index_dir, tmp_path, monkeypatch):
    """bench --rag: the user message of every item holds the text of the chunks recorded for it."""
    from evals.bench import run_bench
    from tools.io import read_jsonl, write_jsonl
    from tools.llm import LlamaRunner

    data = tmp_path / "items.jsonl"
    write_jsonl(data, [{"id": "q1", "question": "Are thiazide diuretics a first-line treatment for stage 1 "
                                                "hypertension?", "context": "", "options": {"yes": "yes", "no": "no",
                                                                                            "maybe": "maybe"},
                        "answer": "yes"}])
    seen: list[str] = []
    orig = LlamaRunner.render_messages

    def render_messages(self, messages):
        seen.append(messages[-1]["content"])
        return orig(self, messages)
    monkeypatch.setattr(LlamaRunner, "render_messages", render_messages)
    art = run_bench("pubmedqa", data=data, mode="loglik", threads=1, out=tmp_path / "b", rag=index_dir, k=2,
                    plots=False)
    row = next(iter(read_jsonl(art.path / "items.jsonl")))
    chunks = {c["id"]: c["text"] for c in read_jsonl(index_dir / "chunks.jsonl", required=("id", "text"))}
    assert row["chunks"] and row["chunks"][0]["id"].startswith("htn")
    prompts = [u for u in seen if "thiazide diuretics a first-line" in u]
    assert prompts, seen
    for c in row["chunks"]:
        assert chunks[c["id"]].strip() in prompts[-1], c["id"]

    # the same through the console script: the same chunks, and the index recorded as an input
    from tests.helpers import run_tools

    p = run_tools("bench", "pubmedqa", "--data", data, "--mode", "loglik", "--threads", "1", "--rag", index_dir,
                  "--k", "2", "--out", tmp_path / "cli", "--json", check=True)
    out = json.loads(p.stdout)
    assert out["manifest"]["params"]["rag"] == {"index": str(index_dir), "k": 2}
    assert any(i["path"] == str(index_dir) for i in out["manifest"]["inputs"])
    cli_row = next(iter(read_jsonl(tmp_path / "cli" / "items.jsonl")))
    assert [c["id"] for c in cli_row["chunks"]] == [c["id"] for c in row["chunks"]]
    assert cli_row["loglik"] == pytest.approx(row["loglik"], abs=1e-4)  # the same prompt, the same scores
