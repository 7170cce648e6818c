"""Intervals on every bench figure and `tools report A B`'s paired tests (McNemar, bootstrap)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.helpers import fake_bench
from tools.artifact import read_artifact


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """The Wilson interval as the roots of (p - k/n)^2 = z^2 p (1 - p) / n."""
    z = 1.959963984540054
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


@pytest.mark.parametrize("k,n", [(15, 40), (20, 40), (0, 10), (10, 10), (1, 2), (437, 500)])
def test_wilson_matches_the_hand_computation(k, n):
    from evals.stats import wilson
    lo, hi = wilson(k, n)
    hlo, hhi = _wilson_by_hand(k, n)
    assert lo == pytest.approx(max(0.0, hlo), abs=1e-6) and hi == pytest.approx(min(1.0, hhi), abs=1e-6)
    assert lo <= k / n <= hi


def test_demo_sized_interval_is_about_15_points():
    """The issue's example: 40 items at 37.5 % -> about +-15 points, so 37.5 vs 50.0 is not decided by it."""
    from evals.stats import wilson
    lo, hi = wilson(15, 40)
    assert (round(lo, 4), round(hi, 4)) == (0.2422, 0.5297)
    assert wilson(20, 40)[0] < 0.375 < wilson(20, 40)[1]


def test_bootstrap_macro_f1_is_the_plain_loop_over_the_same_draws():
    from evals.bench import classification_metrics
    from evals.stats import bootstrap_macro_f1
    labels = ["yes", "no", "maybe"]
    gold = ["yes", "no", "maybe", "yes", "no", "yes", "yes", "no", "maybe", "yes", "no", "no"]
    pred = ["yes", "no", None, "no", "no", "yes", "maybe", "yes", "maybe", "yes", None, "no"]
    got = bootstrap_macro_f1(labels, gold, pred, seed=3, b=200)
    draws = np.random.default_rng(3).integers(0, len(gold), size=(200, len(gold)))
    vals = [classification_metrics(labels, [gold[i] for i in d], [pred[i] for i in d])["macro_f1"] for d in draws]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    assert got == pytest.approx([lo, hi], abs=2e-6)
    assert got == bootstrap_macro_f1(labels, gold, pred, seed=3, b=200)  # seeded: the same interval again
    point = classification_metrics(labels, gold, pred)["macro_f1"]
    assert got[0] <= point <= got[1]


def test_exact_mcnemar_by_hand():
    from evals.stats import mcnemar, mcnemar_exact
    # b=2, c=9: p = 2 * (C(11,0) + C(11,1) + C(11,2)) / 2^11 = 134 / 2048
    assert mcnemar_exact(2, 9) == pytest.approx(134 / 2048, abs=1e-6)
    assert mcnemar_exact(9, 2) == mcnemar_exact(2, 9)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(0, 6) == pytest.approx(2 / 64, abs=1e-6)
    m = mcnemar([True, True, False, False, True], [True, False, True, True, True])
    assert (m["a_right_b_wrong"], m["a_wrong_b_right"], m["both_right"], m["both_wrong"]) == (1, 2, 2, 0)


def test_report_runs_mcnemar_on_the_shared_items(tools_cli, tmp_path):
    n = 30
    gold = ["yes" if i % 3 else "no" for i in range(n)]
    a = [i < 12 for i in range(n)]                    # A right on q0..q11
    b = [i < 2 or 10 <= i < 25 for i in range(n)]     # B right on q0,q1 and q10..q24
    # discordant: A right/B wrong = q2..q9 (8); A wrong/B right = q12..q24 (13)
    da, db = fake_bench(tmp_path, "base", a, gold), fake_bench(tmp_path, "tuned", b, gold)
    p = tools_cli("report", da, db, "--out", tmp_path / "rep")
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "rep" / "compare.json").read_text())
    mc = doc["mcnemar"]
    assert (mc["a_right_b_wrong"], mc["a_wrong_b_right"]) == (8, 13)
    from evals.stats import mcnemar_exact
    assert mc["p"] == mcnemar_exact(8, 13) and mc["p"] > 0.05
    assert doc["b_beats_a_95"] is False and "tuned does not beat base at 95 %" in p.stdout
    assert doc["runs"][0]["accuracy_ci95"] and "[95 % CI]" in p.stdout
    f1 = doc["comparisons"][0]["macro_f1_paired_bootstrap"]
    assert f1["ci95"][0] <= f1["diff"] <= f1["ci95"][1]
    # a clear gain: B right wherever A is, and on 12 more items -> significant
    dc = fake_bench(tmp_path, "better", [i < 24 for i in range(n)], gold)
    p = tools_cli("report", da, dc, "--label", "base", "--label", "better", "--out", tmp_path / "rep2")
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "rep2" / "compare.json").read_text())
    assert (doc["mcnemar"]["a_right_b_wrong"], doc["mcnemar"]["a_wrong_b_right"]) == (0, 12)
    assert doc["mcnemar"]["p"] == pytest.approx(2 / 4096, abs=1e-6)
    assert doc["b_beats_a_95"] is True and "better beats base on accuracy at 95 %" in p.stdout
    assert read_artifact(tmp_path / "rep2").stage == "report.compare"


def test_report_pairs_only_the_items_both_runs_answered(tools_cli, tmp_path):
    """Runs over different items: the paired tests use the shared ones only; none shared, or another task: exit 2,
    one line, no report."""
    gold = ["yes"] * 20
    a = fake_bench(tmp_path, "a", [True] * 10 + [False] * 10, gold)               # q0..q19, right on q0..q9
    b = fake_bench(tmp_path, "b", [False] * 5 + [True] * 15, gold, first_id=10)  # q10..q29, right on q15..q29
    p = tools_cli("report", a, b, "--out", tmp_path / "rep")
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "rep" / "compare.json").read_text())
    # shared q10..q19: A wrong on all of them, B right on q15..q19 -> 0 and 5 discordant
    assert doc["comparisons"][0]["n_shared"] == 10
    assert (doc["mcnemar"]["a_right_b_wrong"], doc["mcnemar"]["a_wrong_b_right"]) == (0, 5)
    assert doc["comparisons"][0]["accuracy_a"] == 0.0 and doc["comparisons"][0]["accuracy_b"] == 0.5
    c = fake_bench(tmp_path, "c", [True] * 5, ["yes"] * 5, first_id=100)
    m = fake_bench(tmp_path, "m", [True] * 5, ["yes"] * 5, task="medqa")
    for other, words in ((c, "share no items"), (m, "is a medqa run")):
        p = tools_cli("report", a, other, "--out", tmp_path / "refused")
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and words in lines[0], p.stderr
        assert not (tmp_path / "refused").exists()


def test_card_prints_the_intervals(tmp_path):
    from release.card import CardFacts, _body, read_bench
    from tools.artifact import Lineage
    d = fake_bench(tmp_path, "tuned", [i < 15 for i in range(40)], ["yes"] * 40)
    art = read_artifact(d)
    b = read_bench(art)
    assert b["accuracy_ci95"] == pytest.approx([0.2422, 0.5297], abs=1e-4)
    from collections import defaultdict
    groups = defaultdict(list, {"bench": [art]})
    body = _body(CardFacts("demo", "base", "quantized", groups, [(art, b)], [], Lineage(), False, "mit"))
    assert "| pubmedqa | 37.5% [24.2, 53.0] | 100.0% [91.2, 100.0] | 40 |" in body
