"""`tools eval suite open-medical`: lm-eval's own requests, our scorer, the artifact; MedMCQA's cop layouts."""
from __future__ import annotations

import json

import pytest

from tools.errors import UserError

MEDMCQA = [  # four MedMCQA-shaped rows, gold letters A, D, B, C
    {"id": "m1", "question": "Drug of choice for absence seizures?", "opa": "Ethosuximide", "opb": "Phenytoin",
     "opc": "Carbamazepine", "opd": "Gabapentin", "subject_name": "Pharmacology"},
    {"id": "m2", "question": "Vitamin deficient in scurvy?", "opa": "A", "opb": "B1", "opc": "D", "opd": "C",
     "subject_name": "Biochemistry"},
    {"id": "m3", "question": "Largest organ of the body?", "opa": "Liver", "opb": "Skin", "opc": "Brain",
     "opd": "Lung", "subject_name": "Anatomy"},
    {"id": "m4", "question": "Normal adult resting heart rate (per minute)?", "opa": "20-40", "opb": "150-200",
     "opc": "60-100", "opd": "120-140", "subject_name": "Physiology"},
]
GOLD = "ADBC"


def _medmcqa(path, base, rows=MEDMCQA, gold=GOLD):
    path.write_text("".join(json.dumps({**r, "cop": "ABCD".index(g) + base}) + "\n" for r, g in zip(rows, gold)))
    return path


# ---- MedMCQA cop: 1-based on GitHub, 0-based on the Hub -------------------------------------

def test_medmcqa_cop_either_layout_gives_the_right_letters(tmp_path):
    from evals.mcq import load_mcq, medmcqa_docs, parse_map

    m = parse_map(["options=opa+opb+opc+opd", "answer=cop"])
    for base in (0, 1):
        f = _medmcqa(tmp_path / f"dev{base}.json", base)
        assert "".join(it.answer for it in load_mcq(f, m)[0]) == GOLD
        assert "".join(it.answer for it in load_mcq(f, m, limit=2)[0]) == GOLD[:2]  # base told from the whole file
        assert ["ABCD"[d["cop"]] for d in medmcqa_docs(f)] == list(GOLD)
    # a file whose cops show neither base (no 0, no 4) is refused, unless the base is declared
    amb = _medmcqa(tmp_path / "amb.json", 1, MEDMCQA[1:3], "CB")   # cops 3, 2
    with pytest.raises(UserError, match=r"amb.json \[cop\]: integer answers 2..3 could be 0-based or 1-based"):
        load_mcq(amb, m)
    with pytest.raises(UserError, match="--answer-base"):
        medmcqa_docs(amb)
    assert [it.answer for it in load_mcq(amb, {**m, "answer_base": ["1"]})[0]] == ["C", "B"]
    assert ["ABCD"[d["cop"]] for d in medmcqa_docs(amb, 0)] == ["D", "C"]
    with pytest.raises(UserError, match=r"out of range 1..4 \(1-based\)"):
        medmcqa_docs(_medmcqa(tmp_path / "zero.json", 0), 1)   # a 0 under a declared 1-based layout


def test_bench_mcq_ambiguous_cop_exits_2_in_one_line(tools_cli, tmp_path):
    amb = _medmcqa(tmp_path / "amb.json", 1, MEDMCQA[1:3], "CB")
    out = tmp_path / "out"
    p = tools_cli("bench", "mcq", "--data", amb, "--map", "options=opa+opb+opc+opd", "--map", "answer=cop",
                  "--mode", "loglik", "--out", out)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{amb} [cop]" in lines[0] and "--answer-base" in lines[0]
    assert not out.exists()


# ---- the suite -------------------------------------------------------------------------------

class _Recorder:
    """An lm-eval model that records the (context, continuation) pairs lm-eval's evaluator sends."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class Rec(LM):
            def __init__(self):
                super().__init__()
                self.pairs = []

            def loglikelihood(self, requests, disable_tqdm=False):
                self.pairs += [r.args for r in requests]
                return [(-float(len(r.args[1])), False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError
        return Rec()


def test_prompts_are_lm_evals_own(tmp_path):
    """Every task's contexts and continuations are what lm-eval's evaluator sends a model for the
    same docs, byte for byte; the docs have the Hub schema the task file reads (spot checks)."""
    from lm_eval.evaluator import evaluate

    from evals import suite

    files, skipped = suite.resolve_data(suite.SuiteSpec(data={"medmcqa": str(_medmcqa(tmp_path / "d.json", 1))}))
    assert not skipped and len(files) == 9
    loaded = suite.load_tasks(suite.SuiteSpec(data={"medmcqa": str(files["medmcqa"])}, limit=3), files)
    rec = _Recorder()   # one run of lm-eval's evaluator over the nine task objects
    evaluate(lm=rec, task_dict={t.name: suite.build_task(t, t.docs(files[t.name])) for t, _, _ in loaded}, limit=3,
             bootstrap_iters=0, log_samples=False)
    theirs = {tuple(p) for p in rec.pairs}
    ours = [(ctx, c) for _, _, reqs in loaded for _, ctx, conts in reqs for c in conts]
    assert len(ours) == len(rec.pairs) == len(set(ours)) and set(ours) == theirs
    ctx = {t.name: reqs[0][1:] for t, _, reqs in loaded}
    assert ctx["medmcqa"] == ("Question: Drug of choice for absence seizures?\nChoices:\nA. Ethosuximide\n"
                              "B. Phenytoin\nC. Carbamazepine\nD. Gabapentin\nAnswer:", [" A", " B", " C", " D"])
    assert ctx["medqa_4options"][0].startswith("Question: A junior orthopaedic surgery resident")
    assert ctx["medqa_4options"][0].endswith("\nD. Refuse to dictate the operative report\nAnswer:")
    assert ctx["pubmedqa"][0].startswith("Abstract: Programmed cell death (PCD) is the regulated death")
    assert ctx["pubmedqa"][1] == [" yes", " no", " maybe"]
    assert ctx["mmlu_anatomy"][0].startswith("The following are multiple choice questions (with answers) about "
                                             "anatomy.\n\n")
    gold = {t.name: [task.doc_to_target(d) for d, _, _ in reqs] for t, task, reqs in loaded}
    assert gold["medmcqa"] == [0, 3, 1] and gold["medqa_4options"][0] == 1 and gold["pubmedqa"][0] == "yes"


@pytest.mark.native
def test_suite_limit_table_items_and_resume(tools_cli, tmp_path):
    from evals.bench import scratch_path
    from evals.suite import OPEN_MEDICAL
    from tools.artifact import read_artifact

    dev = _medmcqa(tmp_path / "dev.json", 1)
    args = ["eval", "suite", "open-medical", "--limit", "1", "--data", f"medmcqa={dev}", "--threads", "1", "--json"]
    p = tools_cli(*args, "--out", tmp_path / "a")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert len(res["tasks"]) == 9 and not res["skipped"] and res["n"] == 9
    for v in res["tasks"].values():
        assert v["n"] == 1 and v["acc_ci95"][0] <= v["acc"] <= v["acc_ci95"][1]
    assert res["tasks"]["medmcqa"]["data"]["source"] == "--data" and res["tasks"]["medmcqa"]["acc_norm"] is not None
    assert res["tasks"]["pubmedqa"]["acc_norm"] is None   # lm-eval's pubmedqa defines acc only
    assert res["average"] == pytest.approx(sum(v["acc"] for v in res["tasks"].values()) / 9, abs=1e-6)
    a = tmp_path / "a"
    rows = [json.loads(x) for x in (a / "medmcqa" / "items.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == [0] and all(len(r["loglik"]) == 4 for r in rows)
    assert all(r["acc"] == float(r["pred"] == r["gold"]) for r in rows)
    report = (a / "report.md").read_text()
    assert "| **Average** (9 tasks, unweighted) | 9 |" in report and "| Model | Average | MedMCQA |" in report
    assert (a / "suite.png").stat().st_size > 0
    # resume: a scratch file with the first 8 questions (one altered) beside a new OUT is taken as done
    fp = read_artifact(a).manifest["fingerprint"]
    order = [t.name for t in OPEN_MEDICAL]   # the order the suite scores in
    done = [json.loads(x) for t in order for x in (a / t / "items.jsonl").read_text().splitlines()][:8]
    assert done[2]["task"] == "pubmedqa"
    done[2]["loglik"] = [0.0, -1.0, -2.0]
    b = tmp_path / "b"
    scratch_path(b, fp).write_text("".join(json.dumps(r) + "\n" for r in done))
    p = tools_cli(*args, "--out", b)
    assert p.returncode == 0, p.stderr
    assert "resuming: 8 of 9 questions already done" in p.stderr
    pq = [json.loads(x) for x in (b / "pubmedqa" / "items.jsonl").read_text().splitlines()]
    assert pq == [done[2]]
    last = order[-1]   # the one question scored again gives the numbers of the first run
    assert (b / last / "items.jsonl").read_text() == (a / last / "items.jsonl").read_text()
    assert not scratch_path(b, fp).exists()


def test_suite_bad_data_names_exit_2(tools_cli, tmp_path):
    p = tools_cli("eval", "suite", "open-medical", "--data", "medmcqa", "--out", tmp_path / "o")
    assert p.returncode == 2 and "--data: 'medmcqa' is not TASK=FILE" in p.stderr
    p = tools_cli("eval", "suite", "open-medical", "--data", "medcqa=x.json", "--out", tmp_path / "o")
    assert p.returncode == 2 and "unknown task 'medcqa'" in p.stderr
    assert not (tmp_path / "o").exists()
