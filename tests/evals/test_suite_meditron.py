"""`tools eval suite meditron`: Meditron's protocol over the bench item loop; seeds, unparseable answers, resume."""
from __future__ import annotations

import json
import statistics

import pytest

from tests.evals.test_suite import MEDMCQA, _medmcqa

MEDQA_TINY = [  # short questions: a real generation costs little
    {"id": "t1", "question": "Which organ pumps blood?",
     "options": {"A": "Heart", "B": "Liver", "C": "Kidney", "D": "Lung"}, "answer": "A"},
    {"id": "t2", "question": "Which vitamin does the skin make in sunlight?",
     "options": {"A": "Vitamin C", "B": "Vitamin D", "C": "Vitamin K", "D": "Vitamin B12"}, "answer": "B"},
]
COLUMNS = ("MMLU-Medical", "PubMedQA", "MedMCQA", "MedQA", "MedQA-4-Option")
# what the fake model answers to item k under seed s: KINDS[(k + s) % 4]
KINDS = ("think-right", "unparseable", "wrong", "bare-right")


def _answer(kind: str, flavor: str, gold: str, labels: list[str]) -> str:
    """A response whose answer a correct extractor reads as ``gold``, another label, or not at all;
    the reasoning inside <think> always names a different answer."""
    wrong = labels[(labels.index(gold) + 1) % len(labels)]
    g, w = (gold, wrong) if flavor == "pubmedqa" else (f"({gold})", f"({wrong})")
    return {"think-right": f"<think>Not {g}; the answer is {w}.</think>\nFinal Answer: {gold}",
            "unparseable": f"<think>The answer is {g}.</think>\nI am not sure.",
            "wrong": f"{w} because.", "bare-right": gold}[kind]


def _fake_model(monkeypatch, spec) -> None:
    """LlamaRunner.generate answers by KINDS, finding the item by the last question (and its options) in the prompt."""
    from evals import suite_meditron as sm
    from tools.llm import LlamaRunner, item_seed

    units, _ = sm.resolve_units(spec)
    known, suite_seed = [], {}
    for u in units:
        plan = sm.plan_bench(sm.unit_spec(spec, u, 0))
        for k, it in enumerate(plan.items):
            opts = [f"({lab}) {txt.strip()}" for lab, txt in it.options.items()] if plan.flavor != "pubmedqa" else []
            known.append((it.question.strip(), opts, plan.flavor, it.answer, list(it.options), k))
            suite_seed.update({item_seed(s, it.id): s for s in range(spec.seeds)})

    def generate(self, prompt_tokens, *, max_tokens, sampling, seed, decided=None, _evaluated=False):
        text = self.detokenize(prompt_tokens)   # the asked question is the last one (shots come before it)
        at = {i: text.rfind(h[0]) for i, h in enumerate(known)}
        hits = [i for i, p in at.items() if p >= 0 and all(o in text[p:] for o in known[i][1])]
        q, opts, flavor, gold, labels, k = known[max(hits, key=lambda i: (at[i], len(known[i][1])))]
        return _answer(KINDS[(k + suite_seed[seed]) % 4], flavor, gold, labels), 4, "stop"

    monkeypatch.setattr(LlamaRunner, "generate", generate)


@pytest.mark.native
def test_meditron_table_seeds_and_unparseable(tmp_path, monkeypatch):
    """All five tasks, 2 questions each (MMLU: each of nine subjects), 1 shot, 3 seeds, on the embedded GGUF with
    its generation replaced by known responses: per-seed accuracy and unparseable counts are what the responses
    say (reasoning inside <think> is never the answer), and mean, SD and counts recompute from the item files."""
    from evals import suite_meditron as sm

    med = _medmcqa(tmp_path / "dev.json", 1)
    train = _medmcqa(tmp_path / "train.json", 1, [{**r, "id": r["id"] + "t", "question": r["question"] + " (train)"}
                                                    for r in MEDMCQA])
    out = tmp_path / "m"
    spec = sm.MeditronSpec(data={"medmcqa": str(med)}, dev={"medmcqa": str(train)}, limit=2, shots=1, seeds=3,
                           threads=1, out=out)
    _fake_model(monkeypatch, spec)
    res = json.loads((sm.run_meditron(spec).path / "results.json").read_text())
    assert res["order"] == ["mmlu_medical", "pubmedqa", "medmcqa", "medqa", "medqa4"]   # Meditron's table order
    assert set(res["tasks"]) == set(res["order"]) and not res["not_run"]
    expect_right, expect_bad = [1, 0, 1], [1, 1, 0]   # of two items, seeds 0, 1, 2 (KINDS)
    for name, v in res["tasks"].items():
        units = 9 if name == "mmlu_medical" else 1
        assert v["n"] == 2 * units and v["seeds"] == [0, 1, 2]
        assert [p["correct"] for p in v["per_seed"]] == [units * c for c in expect_right], name
        assert [p["unparseable"] for p in v["per_seed"]] == [units * c for c in expect_bad], name
        assert v["accuracy"] == pytest.approx(1 / 3, abs=1e-6) and v["accuracy_sd"] == pytest.approx(0.288675, abs=1e-6)
        assert v["unparseable"] == 2 * units and v["unparseable_rate"] == pytest.approx(1 / 3, abs=1e-6)
        assert v["accuracy_parsed"] == pytest.approx(0.5)
        # the same figures from the item files alone
        rows = [json.loads(x) for x in (out / name / "items.jsonl").read_text().splitlines()]
        by_seed = {s: [r for r in rows if r["seed"] == s] for s in (0, 1, 2)}
        accs = [statistics.fmean(bool(r["correct"]) for r in b) for b in by_seed.values()]
        assert v["accuracy"] == pytest.approx(statistics.fmean(accs), abs=1e-6)
        assert v["accuracy_sd"] == pytest.approx(statistics.stdev(accs), abs=1e-6)
        assert v["unparseable"] == sum(r["parsed"] is None for r in rows)
        assert [p["n"] for p in v["per_seed"]] == [len(b) for b in by_seed.values()]
    assert len(res["tasks"]["mmlu_medical"]["subjects"]) == 9
    shots = res["tasks"]["medqa"]["shots"]   # one shot drawn per seed from the 1272 dev questions
    assert [s["seed"] for s in shots] == [0, 1, 2] and len({tuple(s["ids"]) for s in shots}) == 3
    assert res["average"] == pytest.approx(1 / 3, abs=1e-6) and res["average_sd"] == pytest.approx(0.288675, abs=1e-6)
    report = (out / "report.md").read_text()
    for col in COLUMNS:
        assert f"| {col} | " in report
    assert "| Model | MMLU-Medical | PubMedQA | MedMCQA | MedQA | MedQA-4-Option | Avg |" in report
    assert "| **Average** (5 tasks, unweighted) |" in report and (out / "suite.png").stat().st_size > 0


@pytest.mark.native
def test_meditron_cli_limit_2_resumes(tools_cli, tmp_path):
    """The real model on two short questions; a run whose scratch holds the first item (altered) does only the second."""
    from evals.suite_meditron import unit_scratch
    from tools.artifact import read_artifact

    data = tmp_path / "medqa4.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MEDQA_TINY))
    args = ["eval", "suite", "meditron", "--tasks", "medqa4", "--data", f"medqa4={data}", "--limit", "2", "--seeds", "1",
            "--shots", "0", "--threads", "1", "--json"]
    a, b = tmp_path / "a", tmp_path / "b"
    p = tools_cli(*args, "--out", a)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert res["tasks"]["medqa4"]["n"] == 2 and set(res["not_run"]) == {"mmlu_medical", "pubmedqa", "medmcqa", "medqa"}
    first = [json.loads(x) for x in (a / "medqa4" / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in first] == ["t1", "t2"] and all(r["raw"] is not None for r in first)
    done = {k: v for k, v in first[0].items() if k != "seed"}
    done.update(raw="I am not sure.", parsed=None, correct=False, strict=False)
    fp = read_artifact(a).manifest["fingerprint"]
    unit_scratch(b, fp, "medqa4", 0).write_text(json.dumps(done) + "\n")
    p = tools_cli(*args, "--out", b)
    assert p.returncode == 0, p.stderr
    assert "resuming: 1 of 2 items already done" in p.stderr
    second = [json.loads(x) for x in (b / "medqa4" / "items.jsonl").read_text().splitlines()]
    assert second[0] == {**done, "seed": 0} and second[1] == first[1]   # the item run again: same draw
    assert json.loads(p.stdout)["results"]["tasks"]["medqa4"]["unparseable"] == 1
    assert not unit_scratch(b, fp, "medqa4", 0).exists()


def test_meditron_bad_usage_exits_2(tools_cli, tmp_path):
    med = _medmcqa(tmp_path / "dev.json", 1)
    none = tmp_path / "none.gguf"   # were a check missing, the run would stop at the model, not run for minutes
    for extra, msg in ((["open-medical", "--shots", "3", "--model", none], "--shots: only for tools eval suite meditron"),
                       (["meditron", "--tasks", "medqa,mmlu"], "unknown task 'mmlu'"),
                       (["meditron", "--data", f"medmcqa={med}"], "pass --dev medmcqa=FILE or --shots 0")):
        p = tools_cli("eval", "suite", *extra, "--out", tmp_path / "o")
        assert p.returncode == 2 and msg in p.stderr, (extra, p.stderr)
    assert not (tmp_path / "o").exists()
