"""`tools bench mcq --data FILE` for any multiple-choice or yes/no/maybe JSONL."""
from __future__ import annotations

import json

import pytest

from tools.errors import UserError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loader_maps_fields_and_letters_options(tmp_path):
    from evals.mcq import load_mcq, parse_map
    f = _write(tmp_path / "medmcqa.jsonl", [
        {"qid": "a1", "stem": "Drug of choice for absence seizures?", "opa": "Ethosuximide", "opb": "Phenytoin",
         "opc": "Carbamazepine", "opd": "Gabapentin", "cop": 0},
        {"qid": "a2", "stem": "Vitamin deficient in scurvy?", "opa": "A", "opb": "B1", "opc": "C", "opd": "D",
         "cop": 2, "exp": ["Collagen synthesis", "needs ascorbate"]},
    ])
    items, path, flavor = load_mcq(f, parse_map(["id=qid", "question=stem", "options=opa+opb+opc+opd",
                                                 "answer=cop", "context=exp"]))
    assert flavor == "medqa" and path == f
    assert [i.id for i in items] == ["a1", "a2"]
    assert items[0].options == {"A": "Ethosuximide", "B": "Phenytoin", "C": "Carbamazepine", "D": "Gabapentin"}
    assert items[0].answer == "A" and items[1].answer == "C"
    assert items[1].context == "Collagen synthesis\nneeds ascorbate"
    g = _write(tmp_path / "yn.jsonl", [{"question": "Is it?", "options": ["Yes", "No", "Maybe"], "answer": "No"},
                                       {"question": "Or not?", "options": {"x": "first", "y": "second"}, "answer": "y"}])
    with pytest.raises(UserError, match=r"yn.jsonl:2 \[options\]: mixes yes/no/maybe"):
        load_mcq(g)
    items, _, flavor = load_mcq(g, limit=1)
    assert flavor == "pubmedqa" and items[0].answer == "no" and items[0].id == "1"


@pytest.mark.parametrize("row,field,msg", [
    ({"question": "Q?", "options": ["a", "b"]}, "answer", "missing field 'answer'"),
    ({"question": "Q?", "options": ["a", "b"], "answer": "c"}, "answer", "neither a label"),
    ({"question": "Q?", "options": ["a", "b"], "answer": 5}, "answer", "out of range"),
    ({"question": "Q?", "options": ["a"], "answer": 0}, "options", "at least two"),
    ({"options": ["a", "b"], "answer": 0}, "question", "missing field 'question'"),
])
def test_loader_bad_rows_name_file_line_field(tmp_path, row, field, msg):
    from evals.mcq import load_mcq
    f = _write(tmp_path / "bad.jsonl", [{"question": "fine?", "options": ["a", "b"], "answer": "a"}, row])
    with pytest.raises(UserError, match=rf"bad.jsonl:2 \[{field}\]: .*{msg}"):
        load_mcq(f)


def test_row_without_answer_exits_2_with_file_line(tools_cli, tmp_path):
    f = _write(tmp_path / "exam.jsonl", [{"question": "Q1?", "options": ["a", "b"], "answer": 1},
                                         {"question": "Q2?", "options": ["a", "b"]}])
    out = tmp_path / "out"
    p = tools_cli("bench", "mcq", "--data", f, "--out", out)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{f}:2 [answer]" in lines[0] and "missing field 'answer'" in lines[0]
    assert not out.exists()
    p = tools_cli("bench", "mcq", "--out", out)
    assert p.returncode == 2 and "--data" in p.stderr


def test_bench_mcq_loglik_with_map(tools_cli, tmp_path):
    """A renamed-field exam runs under the protocol: per-option log-likelihoods, intervals, report."""
    f = _write(tmp_path / "exam.jsonl", [
        {"n": 1, "q": "Which organ produces insulin?", "choices": ["Liver", "Pancreas", "Kidney"], "key": "Pancreas"},
        {"n": 2, "q": "Which vitamin deficiency causes scurvy?", "choices": ["Vitamin C", "Vitamin D", "Vitamin K"],
         "key": 0},
    ])
    out = tmp_path / "mcq"
    p = tools_cli("bench", "mcq", "--data", f, "--map", "id=n", "--map", "question=q", "--map", "options=choices",
                  "--map", "answer=key", "--mode", "loglik", "--threads", "1", "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert res["task"] == "mcq" and res["flavor"] == "medqa" and res["n"] == 2
    assert res["map"]["options"] == ["choices"] and res["confusion"]["labels"] == ["A", "B", "C"]
    assert len(res["accuracy_ci95"]) == 2 and res["accuracy_ci95"][0] <= res["accuracy"] <= res["accuracy_ci95"][1]
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert [(r["id"], r["gold"]) for r in rows] == [("1", "B"), ("2", "A")]
    assert all(set(r["loglik"]) == {"A", "B", "C"} for r in rows)
    assert json.loads((out / "manifest.json").read_text())["stage"] == "bench.mcq"
    assert "95 % interval" in (out / "report.md").read_text()
