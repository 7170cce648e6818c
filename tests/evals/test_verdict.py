"""`tools report ... --evidence`: the ship-or-not block, from the paired test and the run's release evidence;
when the gain is not significant, the items a paired test would need (checked against the exact test)."""
from __future__ import annotations

import json

from evals.stats import mcnemar_exact, mcnemar_items_needed
from tests.helpers import fake_bench
from tools.artifact import Stage


def _pair(tmp_path, a_right: list[bool], b_right: list[bool]):
    gold = ["yes"] * len(a_right)
    return fake_bench(tmp_path, "base", a_right, gold), fake_bench(tmp_path, "tuned", b_right, gold)


def _audit(path, passed: bool):
    with Stage("audit", path, {"passed": passed}) as st:
        st.path("audit.json").write_text("{}")
        st.extra["audit"] = {"passed": passed, "files": [{"name": "m.gguf", "sha256": "0" * 64}],
                             "summary": {"extraction_rate": 0.5 if not passed else 0.0, "extraction_base_rate": 0.0,
                                         "membership_auc": 0.97, "membership_auc_ci95": [0.9, 1.0],
                                         "max_exposure_bits": 33.2}}
    return path


def _quant_table(path):
    with Stage("gguf.set", path, {"t": 1}) as st:
        st.path("quant-table.md").write_text("table")
        st.extra.update({"tokens_scored": 255, "table": [{"type": "Q3_K_L", "mean_kl": 0.179},
                                                         {"type": "Q4_K_M", "mean_kl": 0.058}]})
    return path


def _ship(tmp_path, tools_cli, a, b, *evidence, name="r"):
    args = [x for e in evidence for x in ("--evidence", e)]
    p = tools_cli("report", a, b, *args, "--out", tmp_path / name)
    assert p.returncode == 0, p.stderr
    return json.loads((tmp_path / name / "compare.json").read_text())["ship"], (tmp_path / name / "report.md").read_text()


def test_items_needed_would_settle_the_observed_difference():
    assert mcnemar_items_needed(5, 8, 40) == 452       # Connor 1987 by hand: 451.1 rounded up
    assert mcnemar_items_needed(4, 4, 40) is None       # no difference observed
    for b, c, n in ((5, 8, 40), (3, 9, 40), (10, 4, 60)):
        need = mcnemar_items_needed(b, c, n)
        assert need > n
        # at the observed rates, that many items make the exact test significant; a third of them do not
        assert mcnemar_exact(round(b * need / n), round(c * need / n)) < 0.05
        assert mcnemar_exact(round(b * need / 3 / n), round(c * need / 3 / n)) >= 0.05
    assert mcnemar_items_needed(3, 9, 40) < mcnemar_items_needed(5, 8, 40)   # a larger effect needs fewer


def test_verdict_block_ship_not_settled_and_do_not_ship(tmp_path, tools_cli):
    # 40 items, B wins 8 and loses 5: not significant -> not settled, with the items that would settle it
    a_right = [i < 20 for i in range(40)]
    b_right = [(i < 15) or (20 <= i < 28) for i in range(40)]
    a, b = _pair(tmp_path / "inc", a_right, b_right)
    ship, md = _ship(tmp_path, tools_cli, a, b, _quant_table(tmp_path / "qt"), name="inc-report")
    assert ship["decision"] == "not settled" and ship["items_needed"] == 452
    assert "## Verdict: not settled" in md and "about 452 items would settle" in md and "Q3_K_L 0.1790" in md
    # B wins 15 and loses 1: ships with a passing audit, does not with a failing one
    b_right = [(i < 19) or (20 <= i < 35) for i in range(40)]
    a, b = _pair(tmp_path / "sig", a_right, b_right)
    ship, md = _ship(tmp_path, tools_cli, a, b, _audit(tmp_path / "ok", True), name="ok-report")
    assert ship["decision"] == "ship" and md.index("## Verdict: ship") < md.index("| run | model |")
    assert "[95 % CI" in md and "audit passed" in md
    ship, md = _ship(tmp_path, tools_cli, a, b, _audit(tmp_path / "bad", False), name="bad-report")
    assert ship["decision"] == "do not ship" and "| memorization | NO | audit FAILED" in md
    # the base is the better one: do not ship, whatever else
    a, b = _pair(tmp_path / "worse", b_right, a_right)
    ship, _ = _ship(tmp_path, tools_cli, a, b, _audit(tmp_path / "ok2", True), name="worse-report")
    assert ship["decision"] == "do not ship" and ship["checks"][0]["line"].startswith("worse than the base")
    # a verdict needs the base and a second run
    p = tools_cli("report", a, "--evidence", tmp_path / "ok", "--out", tmp_path / "one")
    assert p.returncode == 2 and "two runs" in p.stderr and not (tmp_path / "one").exists()


def test_verdict_states_the_checkpoint_select_by_kept():
    from types import SimpleNamespace

    from evals.verdict import verdict_block

    sel = {"by": "pubmedqa-dev:20", "chosen_step": 5, "last_step": 10, "n": 20, "checkpoints": [
        {"step": 5, "n": 20, "accuracy": 0.5, "accuracy_ci95": [0.2993, 0.7007]},
        {"step": 10, "n": 20, "accuracy": 0.35, "accuracy_ci95": [0.1812, 0.5671]}]}
    test = {"n_shared": 40, "mcnemar": {"a_right_b_wrong": 6, "a_wrong_b_right": 11, "p": 0.3323},
            "accuracy_a": 0.375, "accuracy_b": 0.5, "b_beats_a_95": False}
    v = verdict_block(test, [SimpleNamespace(stage="train", extra={"selection": sel}),
                             SimpleNamespace(stage="bench.pubmedqa", extra={"selection": sel})])
    rows = [c for c in v["checks"] if c["check"] == "checkpoint"]
    assert len(rows) == 1 and rows[0]["status"] == "info"
    assert rows[0]["line"] == ("step 5 of 10, the best of 2 on 20 dev items (pubmedqa-dev:20): accuracy 50.0% [29.9, 70.1]; "
                               "step 10 35.0%")
