"""Few-shot (no leakage, n_ctx), chain of thought with self-consistency (majority, ties,
one prompt evaluation for N samples) and benches that resume after a kill."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals import extract
from evals.items import Item

# ---- self-consistency ------------------------------------------------------------------------


def test_majority_vote_counts_ties_and_ignores_unparsed():
    from evals.bench import majority
    assert majority(["no", "yes", None, "yes"]) == ("yes", {"no": 1, "yes": 2}, False)
    # a tie: 2 x no, 2 x yes -> the label voted first wins, and the tie is reported
    assert majority([None, "no", "yes", "yes", "no"]) == ("no", {"no": 2, "yes": 2}, True)
    assert majority(["B", "A", "C"]) == ("B", {"A": 1, "B": 1, "C": 1}, True)
    assert majority([None, None]) == (None, {}, False)


@pytest.mark.parametrize("text,label", [
    ("The mitochondria change shape, so yes.\nAnswer: yes", "yes"),
    ("Reasoning...\nAnswer: no\nmore text\n**Answer:** Maybe.", "maybe"),   # the last final line counts
    ("I think the answer is yes", None),                                  # no final line: invalid in CoT
    ("Final answer: No", "no"),
])
def test_cot_final_line_pubmedqa(text, label):
    assert extract.parse_cot("pubmedqa", text, ["yes", "no", "maybe"]).label == label


def test_cot_final_line_medqa_and_decided():
    assert extract.parse_cot("medqa", "Because of X.\nAnswer: (C)", "ABCD").label == "C"
    assert extract.parse_cot("medqa", "Answer: E", "ABCD").label is None
    assert not extract.parse_cot("medqa", "It is (B) maybe.\nAnswer:", "ABCD", final=False).decided
    assert not extract.parse_cot("pubmedqa", "so\nAnswer: ye", "x", final=False).decided
    assert extract.parse_cot("pubmedqa", "so\nAnswer: yes.", "x", final=False).decided


# ---- few-shot ----------------------------------------------------------------------------------

def _it(i, answer, q=None):
    return Item(str(i), q or f"Question number {i}?", "ctx", {k: k for k in ("yes", "no", "maybe")}, answer)


def test_shots_never_test_items_and_stratified():
    from evals.bench import pick_shots
    test = [_it(1, "yes"), _it(2, "no"), _it(3, "maybe")]
    pool = [_it(1, "yes"),                                  # same PubMed id as a test item
            _it(50, "no", q="  question NUMBER 2? "),       # same question text (case/spaces aside)
            *[_it(100 + i, ["yes", "no", "maybe"][i % 3]) for i in range(9)]]
    shots, excluded = pick_shots(pool, 9, seed=0, flavor="pubmedqa", test_items=test, task="pubmedqa")
    assert excluded == 2 and {s.id for s in shots} == {str(100 + i) for i in range(9)}
    shots, _ = pick_shots(pool, 3, seed=5, flavor="pubmedqa", test_items=test, task="pubmedqa")
    assert sorted(s.answer for s in shots) == ["maybe", "no", "yes"]            # stratified by label
    assert [s.id for s in shots] == [s.id for s in pick_shots(pool, 3, 5, "pubmedqa", test, "pubmedqa")[0]]
    with pytest.raises(Exception, match="10 shots asked, the dev pool holds 9"):
        pick_shots(pool, 10, 0, "pubmedqa", test, "pubmedqa")


def test_shots_drop_to_fit_n_ctx_and_come_from_dev(tools_cli, tmp_path):
    out = tmp_path / "fs"
    p = tools_cli("bench", "pubmedqa", "--mode", "loglik", "--limit", "1", "--shots", "3", "--n-ctx", "768",
                  "--threads", "1", "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert res["shots"]["k"] == 3 and len(res["shots"]["ids"]) == 3 and res["shots"]["stratified"]
    from tools.paths import bundled_data
    dev_ids = {json.loads(x)["id"] for x in (bundled_data() / "pubmedqa" / "dev.jsonl").read_text().split("\n") if x}
    test_ids = {json.loads(x)["id"] for x in (bundled_data() / "pubmedqa" / "test.jsonl").read_text().split("\n") if x}
    assert set(res["shots"]["ids"]) <= dev_ids and not set(res["shots"]["ids"]) & test_ids
    assert res["shots"]["source"]["path"].endswith("pubmedqa/dev.jsonl")
    assert all(r["shots"] < 3 for r in rows) and res["shots"]["items_with_fewer_shots"] == 1
    assert all(r["prompt_tokens"] < 768 for r in rows)
    err = " ".join(p.stderr.split())
    assert "1 of 1 items got fewer than 3 shots to fit n_ctx 768" in err and "the question is never cut" in err
    bad = tools_cli("bench", "pubmedqa", "--split", "dev", "--shots", "2", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "dev split" in bad.stderr


# ---- N samples from one prompt evaluation --------------------------------------------------------

@pytest.mark.native
def test_samples_reuse_the_prompt(smollm2_gguf, tmp_path):
    from evals.bench import majority, run_bench
    from tools.llm import LlamaRunner

    with LlamaRunner(smollm2_gguf, n_ctx=512, n_threads=1) as lr:
        system = "You are a careful doctor."
        lr.set_prefix(lr.prefix_for(system))
        toks = lr.tokenize(lr.render(system, "Is aspirin an antiplatelet drug? Think, then end with 'Answer: yes' "
                                             "or 'Answer: no'."))
        n_prefix = len(lr.prefix_for(system))
        samp = {"temperature": 0.8}
        lr.evaluated_tokens = 0
        draws = lr.generate_samples(toks, [11, 22, 11], max_tokens=6, sampling=samp)
        shared = lr.evaluated_tokens
        assert shared == len(toks) - 1 + 3 + sum(ng for _, ng, _ in draws)  # one prompt pass + 1 token a draw
        assert draws[0] == draws[2]               # same seed, same state after the roll-back: the same draw
        lr.evaluated_tokens = 0
        indep = [lr.generate(toks, max_tokens=6, sampling=samp, seed=s) for s in (11, 22, 11)]
        assert lr.evaluated_tokens == 3 * (len(toks) - n_prefix) + sum(ng for _, ng, _ in indep)
    art = run_bench("medqa", limit=1, threads=1, cot=True, samples=3, max_tokens=12, out=tmp_path / "sc",
                    plots=False, n_ctx=1024)
    res = json.loads((art.path / "results.json").read_text())
    row = json.loads((art.path / "items.jsonl").read_text())
    assert res["cot"] is True and res["samples"] == 3 and len(row["samples"]) == 3
    labels = [s["parsed"] for s in row["samples"]]
    assert (row["parsed"], row["votes"], row["tie"]) == majority(labels)
    assert res["self_consistency"]["ties"] == int(row["tie"])
    assert res["valid_rate"] == (1.0 if row["parsed"] else 0.0)
    assert all(s["parsed"] == extract.parse_cot("medqa", s["raw"], "ABCD").label for s in row["samples"])


# ---- resume after a kill ---------------------------------------------------------------------------

def _tools():
    return [str(Path(sys.executable).parent / "tools")]


def _scratch_lines(out: Path) -> int:
    files = list(out.parent.glob(f".{out.name}.items-*.jsonl"))
    return sum(1 for f in files for line in f.read_text().splitlines() if line.strip()) if files else 0


def _scratch_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for f in out.parent.glob(f".{out.name}.items-*.jsonl")
            for line in f.read_text().splitlines() if line.strip()]


def _run_until(args, out: Path, lines: int, sig) -> subprocess.CompletedProcess:
    # a shell running us in the background hands SIGINT down ignored; Ctrl-C must reach the bench
    p = subprocess.Popen(_tools() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t = time.monotonic()
    while _scratch_lines(out) < lines and p.poll() is None and time.monotonic() - t < 300:
        time.sleep(0.01)
    assert p.poll() is None, f"finished before it could be stopped: {p.stderr.read()}"
    p.send_signal(sig)
    o, e = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, o, e)


def test_kill_and_resume_give_the_same_results(tools_cli, tmp_path):
    args = ["bench", "medqa", "--limit", "4", "--max-tokens", "4", "--threads", "1", "--seed", "3"]
    ref = tools_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    killed = _run_until([*map(str, args), "--out", str(out)], out, 1, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    done = _scratch_lines(out)
    assert 1 <= done < 3
    stopped = _run_until([*map(str, args), "--out", str(out)], out, done + 1, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    # the figure first: the resumed run went on with the next item (none skipped, none done twice)
    ref_ids = [json.loads(x)["id"] for x in (tmp_path / "ref" / "items.jsonl").read_text().splitlines()]
    assert len(ref_ids) == len(set(ref_ids)) == 4
    assert _scratch_ids(out) == ref_ids[: _scratch_lines(out)] and _scratch_lines(out) > done
    assert f"resuming: {done} of 4 items already done" in stopped.stderr
    assert f"continuing from item {done + 1} " in stopped.stderr
    m = re.search(r"interrupted after (\d) of 4 items.*continue from item (\d)", " ".join(stopped.stderr.split()))
    assert m and int(m.group(2)) == int(m.group(1)) + 1 and int(m.group(1)) == _scratch_lines(out)
    fin = tools_cli(*args, "--out", out)
    assert fin.returncode == 0, fin.stderr
    assert f"continuing from item {int(m.group(1)) + 1} " in fin.stderr
    # the figure, not only the message: the manifest says from which item the finished run resumed
    assert json.loads((out / "manifest.json").read_text())["extra"]["resumed_from_item"] == int(m.group(1))
    for f in ("results.json", "items.jsonl", "report.md", "confusion.png", "lengths.png"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert not list(tmp_path.glob(".run.items-*"))  # the resume file goes once the artifact is complete
    assert len(list(tmp_path.glob(".run.partial-*"))) <= 1  # the SIGKILLed run's staging folder, never read
    res = json.loads((out / "results.json").read_text())
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    from evals.stats import wilson
    assert res["accuracy_ci95"] == wilson(sum(r["correct"] for r in rows), 4)
    assert res["valid_rate_ci95"] == wilson(sum(r["parsed"] is not None for r in rows), 4)
    assert len(res["macro_f1_ci95"]) == 2
    assert os.path.getsize(out / "items.jsonl") > 0
