"""Textbooks, guidelines, PubMedQA/MedQA ChatML, Q&A, split, decontaminate."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tools.artifact import read_artifact
from tools.errors import UserError
from tools.paths import bundled_data, system_prompts_file


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def prompts() -> dict:
    return yaml.safe_load(system_prompts_file().read_text(encoding="utf-8"))


# -- textbooks ----------------------------------------------------------------------------------
def test_textbooks_clean_join_and_cut(tmp_path):
    from corpora.textbooks import build_corpus

    src = tmp_path / "books"
    src.mkdir()
    (src / "Anatomy_Gray.txt").write_text(
        "■■■ ■■■\n\n\nChapter 1\nThe Heart\n"
        "The heart is a muscular organ that pumps blood through the circulatory system.\n"
        "      \n--------\n"
        "It has four chambers: two atria and two ventricles ★ separated by valves.\n"
        "Figure 1.2\n"
        "The right atrium receives deoxygenated blood from the superior and inferior venae cavae.\n", encoding="utf-8")
    (src / "Pathology.txt").write_text("Inflammation is the response of vascularized tissue to injury.\n"
                                       "Acute inflammation is rapid in onset and of short duration.\n", encoding="utf-8")
    art = build_corpus(src, tmp_path / "out", doc_words=20, min_chars=10)
    assert art.stage == "corpus.textbooks"
    docs = rows(art.path / "corpus.jsonl")
    assert [d["id"] for d in docs] == ["textbook-Anatomy_Gray-00000", "textbook-Anatomy_Gray-00001",
                                       "textbook-Pathology-00000"]
    first = docs[0]["text"].split("\n")
    # short lines ("Chapter 1", "The Heart") joined to the next one; symbol-only lines and blanks gone
    assert first[0] == "Chapter 1 The Heart The heart is a muscular organ that pumps blood through the circulatory system."
    assert "■" not in docs[0]["text"] and "★" not in docs[0]["text"] and "----" not in docs[0]["text"]
    assert "two atria and two ventricles separated by valves." in docs[0]["text"]
    assert docs[1]["text"].startswith("Figure 1.2 The right atrium")
    assert docs[2]["source"] == "textbook/Pathology.txt"
    assert art.extra["stats"]["documents"] == 3
    # a corpus checked against a benchmark given as a JSONL path (8-grams)
    from corpora.decontam import decontaminate
    bench = tmp_path / "mybench.jsonl"
    bench.write_text(json.dumps({"id": "q1", "question": "Which chamber receives deoxygenated blood from the "
                                 "superior and inferior venae cavae?", "options": {"A": "right atrium"}}) + "\n"
                     + json.dumps({"id": "q2", "question": "What is the capital of France and its river name?"}) + "\n")
    rep = decontaminate(art.path, tmp_path / "dec", against=(str(bench),), ngram=8, min_coverage=0.3)
    d = rep.extra["decontamination"]
    assert [i["id"] for i in d["items"]] == ["textbook-Anatomy_Gray-00001"]
    assert d["items"][0]["matches"][0]["item"] == "mybench:q1" and d["benchmarks"]["mybench"]["items"] == 2
    # a bad byte names the file and line; nothing is written
    (src / "Zbad.txt").write_bytes(b"good line of text here with enough words\ncaf\xe9 line two\n")
    with pytest.raises(UserError, match=r"Zbad\.txt:2: not UTF-8"):
        build_corpus(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# -- guidelines ---------------------------------------------------------------------------------
def _guidelines(tmp_path) -> Path:
    body = "Adults with hypertension should be offered lifestyle advice and, when indicated, drug treatment. " * 4
    items = [{"id": "a1", "source": "cdc", "title": "Hypertension", "clean_text": body, "url": "u"},
             {"id": "a2", "source": "who", "title": "Malaria", "clean_text": "Malaria   treatment:\n\n\n" + body},
             {"id": "a3", "source": "wikidoc", "title": "Gout", "clean_text": body},
             {"id": "a4", "source": "cdc", "title": "Too short", "clean_text": "Wash hands."}]
    f = tmp_path / "guidelines.jsonl"
    f.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return f


def test_guidelines_filter_by_source_and_record_licenses(tmp_path, tools_cli):
    f = _guidelines(tmp_path)
    p = tools_cli("build-corpus", "guidelines", "--src", f, "--source", "cdc,who", "--out", tmp_path / "g", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    art = read_artifact(tmp_path / "g", stage="corpus.guidelines")
    docs = rows(art.path / "corpus.jsonl")
    assert [d["id"] for d in docs] == ["guideline-cdc-a1", "guideline-who-a2"]
    assert docs[1]["text"].startswith("Malaria\n\nMalaria treatment:\n\nAdults")
    lic = art.lineage.licenses
    assert any("CDC" in x for x in lic) and any("WHO" in x for x in lic) and not any("WikiDoc" in x for x in lic)
    assert any("Common Crawl" in x for x in lic)
    assert res["manifest"]["extra"]["per_source"] == {"cdc": 1, "who": 1}
    assert art.manifest["extra"]["stats"]["dropped_source"] == 1 and art.manifest["extra"]["stats"]["dropped_short"] == 1
    # a missing field names file, line and field
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f.read_text().splitlines()[0] + "\n" + json.dumps({"source": "cdc", "title": "x"}) + "\n")
    p = tools_cli("build-corpus", "guidelines", "--src", bad, "--out", tmp_path / "g2")
    assert p.returncode == 2 and p.stderr.strip() == f"error: {bad}:2 [clean_text]: missing field 'clean_text'"
    assert not (tmp_path / "g2").exists()


# -- PubMedQA / MedQA ---------------------------------------------------------------------------
def test_pubmedqa_chatml_from_dev(tmp_path):
    from corpora.sft import build_pubmedqa, pubmedqa_test_ids

    art = build_pubmedqa(tmp_path / "pq")
    assert art.stage == "dataset.pubmedqa"
    data = rows(art.path / "train.jsonl")
    src = rows(bundled_data() / "pubmedqa" / "dev.jsonl")
    assert len(data) == 500 and art.extra["labels"] == {"maybe": 55, "no": 169, "yes": 276}
    assert not {r["meta"]["pmid"] for r in data} & pubmedqa_test_ids()
    r, s = data[0], src[0]
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
    assert r["messages"][0]["content"] == prompts()["pubmedqa"].strip()
    user = r["messages"][1]["content"]
    assert user.startswith("Context: " + s["CONTEXTS"][0])
    assert user.index(s["CONTEXTS"][-1]) < user.index("Question: " + s["QUESTION"])
    assert r["messages"][2]["content"] == f"{s['final_decision']}. {s['LONG_ANSWER']}"
    assert r["meta"]["label"] == s["final_decision"] and r["id"] == f"pubmedqa-{s['id']}"
    # byte-identical on a rebuild
    again = build_pubmedqa(tmp_path / "pq2")
    assert (again.path / "train.jsonl").read_bytes() == (art.path / "train.jsonl").read_bytes()


def test_pubmedqa_ori_pqal_json_drops_test_ids(tmp_path):
    from corpora.sft import build_pubmedqa

    dev = rows(bundled_data() / "pubmedqa" / "dev.jsonl")[:3]
    test = rows(bundled_data() / "pubmedqa" / "test.jsonl")[:2]
    ori = {str(o["id"]): {k: v for k, v in o.items() if k != "id"} for o in dev + test}
    f = tmp_path / "ori_pqal.json"
    f.write_text(json.dumps(ori, indent=1))
    art = build_pubmedqa(tmp_path / "pq", src=f)
    assert [r["meta"]["pmid"] for r in rows(art.path / "train.jsonl")] == [str(o["id"]) for o in dev]
    assert art.extra["excluded_test_ids"] == 2
    only_test = tmp_path / "test_only.json"
    only_test.write_text(json.dumps({str(o["id"]): o for o in test}))
    with pytest.raises(UserError, match="all 2 are PubMedQA benchmark test ids"):
        build_pubmedqa(tmp_path / "pq2", src=only_test)
    del ori[str(dev[1]["id"])]["LONG_ANSWER"]
    f.write_text(json.dumps(ori))
    with pytest.raises(UserError, match=rf"ori_pqal\.json \[{dev[1]['id']}\.LONG_ANSWER\]: missing"):
        build_pubmedqa(tmp_path / "pq3", src=f)
    assert not (tmp_path / "pq3").exists()


def test_medqa_four_and_five_options(tmp_path, tools_cli):
    from corpora.sft import build_medqa

    art = build_medqa(tmp_path / "mq")
    data = rows(art.path / "train.jsonl")
    src = rows(bundled_data() / "medqa" / "dev.jsonl")
    assert len(data) == len(src) - art.extra["excluded_test_questions"]
    r, s = data[0], src[0]
    assert r["messages"][0]["content"] == prompts()["medqa"].strip().replace("{first}", "A").replace("{last}", "D")
    assert "from A to D" in r["messages"][0]["content"]
    user = r["messages"][1]["content"]
    assert user.index(s["question"]) < user.index("(A) " + s["options"]["A"]) < user.index("(D) " + s["options"]["D"])
    assert r["messages"][2]["content"] == f"({s['answer_idx']}) {s['options'][s['answer_idx']]}"
    assert Counter(x["meta"]["answer"] for x in data) == Counter(x["answer_idx"] for x in src)
    # a 5-option file
    five = [{"question": "Which vitamin deficiency causes scurvy in sailors on long voyages?",
             "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D", "E": "Vitamin K"},
             "answer_idx": "C", "answer": "Vitamin C"},
            {"question": "A benchmark test item copied into training data", "options": {}, "answer_idx": "A"}]
    five[1] = dict(src[0], question=rows(bundled_data() / "medqa" / "test.jsonl")[5]["question"])
    f = tmp_path / "five.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in five))
    art5 = build_medqa(tmp_path / "mq5", src=f)
    d5 = rows(art5.path / "train.jsonl")
    assert len(d5) == 1 and art5.extra["excluded_test_questions"] == 1
    assert "from A to E" in d5[0]["messages"][0]["content"]
    assert "(E) Vitamin K" in d5[0]["messages"][1]["content"] and d5[0]["messages"][2]["content"] == "(C) Vitamin C"
    # a bad answer letter names file, line and field, exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(five[0]) + "\n" + json.dumps(dict(five[0], answer_idx="F")) + "\n")
    p = tools_cli("build-dataset", "medqa", "--src", bad, "--out", tmp_path / "mqbad")
    assert p.returncode == 2 and p.stderr.strip().startswith(f"error: {bad}:2 [answer_idx]:"), p.stderr
    assert not (tmp_path / "mqbad").exists()


# -- generic Q&A --------------------------------------------------------------------------------
def _qa_csv(tmp_path) -> Path:
    f = tmp_path / "medquad.csv"
    f.write_text('qid,question,answer,qtype\n'
                 '1,What are the symptoms of gout?,"Sudden, severe pain in a joint,\noften the big toe.",symptoms\n'
                 '2,How is gout treated?,NSAIDs and colchicine.,treatment\n'
                 '3,What are the symptoms of anemia?,"Fatigue, pallor and shortness of breath.",symptoms\n'
                 '4,What are the symptoms of nothing?,,symptoms\n', encoding="utf-8")
    return f


def test_qa_chatml_filter_and_completion(tmp_path, tools_cli):
    f = _qa_csv(tmp_path)
    p = tools_cli("build-dataset", "qa", "--src", f, "--question-col", "question", "--answer-col", "answer",
                  "--filter", "qtype=symptoms", "--system-prompt", "pubmedqa", "--id-col", "qid", "--out", tmp_path / "qa")
    assert p.returncode == 0, p.stderr
    data = rows(tmp_path / "qa" / "train.jsonl")
    assert [r["id"] for r in data] == ["qa-1", "qa-3"]
    assert data[0]["messages"][0]["content"] == prompts()["pubmedqa"].strip()
    assert data[0]["messages"][1:] == [{"role": "user", "content": "What are the symptoms of gout?"},
                                      {"role": "assistant", "content": "Sudden, severe pain in a joint,\noften the big toe."}]
    assert data[0]["meta"] == {"qid": "1", "qtype": "symptoms"}
    art = read_artifact(tmp_path / "qa", stage="dataset.qa")
    assert art.extra["stats"] == {"dropped_empty": 1, "filtered_out": 1, "read": 4}
    from corpora.qa import build_qa
    comp = build_qa(f, tmp_path / "qac", question_col="question", answer_col="answer", fmt="completion")
    c = rows(comp.path / "train.jsonl")
    assert c[1]["text"] == "Question: How is gout treated?\nAnswer: NSAIDs and colchicine."
    assert set(c[1]) == {"id", "text", "source", "meta"}
    # a missing column names the column; a malformed row names its line
    p = tools_cli("build-dataset", "qa", "--src", f, "--question-col", "question", "--answer-col", "reply",
                  "--out", tmp_path / "bad")
    assert p.returncode == 2 and "[reply]: missing column 'reply'" in p.stderr and f"{f}:1" in p.stderr
    g = tmp_path / "ragged.csv"
    g.write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    p = tools_cli("build-dataset", "qa", "--src", g, "--question-col", "question", "--answer-col", "answer",
                  "--out", tmp_path / "bad2")
    assert p.returncode == 2 and p.stderr.strip() == f"error: {g}:3: row has 3 fields, header has 2"
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


# -- split --------------------------------------------------------------------------------------
def test_split_is_stratified_and_deterministic(tmp_path, tools_cli):
    from corpora.sft import build_pubmedqa
    from corpora.split import split_dataset

    src = build_pubmedqa(tmp_path / "pq").path
    p = tools_cli("split", src, "--ratios", "0.8,0.1,0.1", "--stratify-by", "label", "--seed", "7",
                  "--out", tmp_path / "s1")
    assert p.returncode == 0, p.stderr
    s1 = read_artifact(tmp_path / "s1", stage="dataset.pubmedqa")
    parts = {n: rows(s1.path / f"{n}.jsonl") for n in ("train", "validation", "test")}
    ids = [r["id"] for part in parts.values() for r in part]
    assert len(ids) == len(set(ids)) == 500
    assert {n: len(v) for n, v in parts.items()} == {"train": 400, "validation": 50, "test": 50}
    total = Counter(r["meta"]["label"] for part in parts.values() for r in part)
    for name, ratio in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        got = Counter(r["meta"]["label"] for r in parts[name])
        for label, n in total.items():
            assert abs(got[label] - ratio * n) <= 1, (name, label, got[label], ratio * n)
    assert (s1.path / "split.png").stat().st_size > 1000
    assert s1.lineage.licenses == {"MIT (PubMedQA)"}
    # same seed: byte-identical; another seed: another split
    s2 = split_dataset(src, tmp_path / "s2", ratios=(0.8, 0.1, 0.1), stratify_by="label", seed=7)
    for n in ("train", "validation", "test"):
        assert (s2.path / f"{n}.jsonl").read_bytes() == (s1.path / f"{n}.jsonl").read_bytes()
    s3 = split_dataset(src, tmp_path / "s3", ratios=(0.8, 0.1, 0.1), stratify_by="label", seed=8)
    assert (s3.path / "test.jsonl").read_bytes() != (s1.path / "test.jsonl").read_bytes()
    # bad ratios, an unknown field, a split of a split
    assert tools_cli("split", src, "--ratios", "0.8,0.3,0.1", "--out", tmp_path / "x").returncode == 2
    with pytest.raises(UserError, match=r"train\.jsonl:1 \[year2\]"):
        split_dataset(src, tmp_path / "x", stratify_by="year2")
    with pytest.raises(UserError, match="already split"):
        split_dataset(s1.path, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- decontamination ----------------------------------------------------------------------------
def test_decontaminate_flags_copied_benchmark_items(tmp_path, tools_cli):
    from corpora.qa import build_qa

    pq_test = rows(bundled_data() / "pubmedqa" / "test.jsonl")[3]
    mq_test = rows(bundled_data() / "medqa" / "test.jsonl")[10]
    mq_dev = rows(bundled_data() / "medqa" / "dev.jsonl")[0]
    items = [
        {"id": "clean", "q": mq_dev["question"], "a": mq_dev["answer"]},
        {"id": "pubmedqa-copy", "q": " ".join(pq_test["CONTEXTS"]) + " " + pq_test["QUESTION"], "a": "yes"},
        {"id": "medqa-copy", "q": "Consider this case. " + mq_test["question"].upper(), "a": mq_test["answer"]},
        {"id": "boilerplate", "q": "Her temperature is 37°C (98.6°F), pulse is 80/min, respirations are 16/min, "
                                   "and blood pressure is 120/80 mm Hg. What is the next step?", "a": "Observe."},
    ]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(i) + "\n" for i in items))
    ds = build_qa(f, tmp_path / "ds", question_col="q", answer_col="a", id_col="id")
    p = tools_cli("decontaminate", "--train", ds.path, "--out", tmp_path / "clean", "--write-clean", "--json")
    assert p.returncode == 0, p.stderr
    art = read_artifact(tmp_path / "clean", stage="dataset.qa")
    d = art.extra["decontamination"]
    flagged = {i["id"]: i for i in d["items"]}
    assert set(flagged) == {"qa-pubmedqa-copy", "qa-medqa-copy"}
    assert flagged["qa-medqa-copy"]["matches"][0]["item"] == "medqa-test:11"
    assert flagged["qa-pubmedqa-copy"]["matches"][0]["item"] == f"pubmedqa:{pq_test['id']}"
    assert d["per_benchmark"] == {"medqa": 1, "pubmedqa": 1} and d["train_items"] == 4
    assert set(d["benchmarks"]) == {"pubmedqa", "medqa", "mmlu-medical"} and d["benchmarks"]["mmlu-medical"]["items"] == 1871
    assert [r["id"] for r in rows(art.path / "train.jsonl")] == ["qa-clean", "qa-boilerplate"]
    assert json.loads((art.path / "decontamination.json").read_text())["flagged"] == 2
    # report only: its own stage, no data copied
    rep = tools_cli("decontaminate", "--train", ds.path, "--against", "medqa", "--out", tmp_path / "rep")
    assert rep.returncode == 0, rep.stderr
    r = read_artifact(tmp_path / "rep", stage="decontaminate")
    assert r.outputs() == ["report.json"] and r.extra["decontamination"]["flagged"] == 1
    # PubMedQA test ids are caught by id even without shared text
    from corpora.sft import build_pubmedqa
    t = tmp_path / "with_test.jsonl"
    t.write_text(json.dumps(dict(pq_test, CONTEXTS=["unrelated words"], QUESTION="q?", LONG_ANSWER="x")) + "\n")
    leak = build_pubmedqa(tmp_path / "leak", src=t, allow_test_ids=True)
    from corpora.decontam import decontaminate
    res = decontaminate(leak.path, tmp_path / "leakrep", against=("pubmedqa",))
    assert res.extra["decontamination"]["items"][0]["reasons"] == ["PubMedQA test id"]
