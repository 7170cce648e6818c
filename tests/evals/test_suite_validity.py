"""bench/bench_suite_validity.py: the suite on a GGUF agrees with lm-eval's `hf` run of the same checkpoint."""
from __future__ import annotations

import json
import sys

import pytest

from tests.evals.test_suite import _medmcqa


def test_compare_fails_on_a_disagreement():
    sys.path.insert(0, "bench")
    from bench_suite_validity import compare

    theirs = {"pubmedqa": {"acc": 0.5, "pred": [0, 1, 2, 0] * 25}}
    same = {"pubmedqa": {"acc": 0.5, "pred": [0, 1, 2, 0] * 25}}
    assert compare(same, theirs)["pubmedqa"] == {"n": 100, "agreement": 1.0, "acc_suite": 0.5, "acc_lm_eval_hf": 0.5,
                                                  "acc_gap": 0.0, "ok": True}
    flipped = [0, 1, 2, 0] * 25
    for i in (0, 4, 8):
        flipped[i] = 2   # 3 of 100 answers differ
    broken = {"pubmedqa": {"acc": 0.48, "pred": flipped}}
    r = compare(broken, theirs)["pubmedqa"]
    assert r["agreement"] == 0.97 and r["acc_gap"] == 0.02 and not r["ok"]
    with pytest.raises(SystemExit, match="3 questions scored by the suite, 100 by lm-eval"):
        compare({"pubmedqa": {"acc": 0.5, "pred": [0, 1, 2]}}, theirs)


@pytest.mark.slow
@pytest.mark.native
def test_tiny_mode_agrees_on_every_task(smollm2_hf, smollm2_f16, tmp_path, repo):
    dev = _medmcqa(tmp_path / "dev.json", 1)
    (tmp_path / "v").mkdir()   # the script converts smollm2_hf itself unless its f16 is there: the shared one
    (tmp_path / "v" / "model-f16.gguf").symlink_to(smollm2_f16.path / smollm2_f16.extra["file"])
    sys.path.insert(0, str(repo / "bench"))   # the body runs in a forked child (native): the script's main here
    from bench_suite_validity import main
    assert main(["--tiny", "--hf", str(smollm2_hf), "--medmcqa", str(dev), "--threads", "1",
                 "--out", str(tmp_path / "v")]) == 0
    rep = json.loads((tmp_path / "v" / "suite_validity.json").read_text())
    assert len(rep["tasks"]) == 9 and not rep["skipped"]
    for name, r in rep["tasks"].items():
        assert r["n"] == 1 and r["agreement"] == 1.0 and r["acc_gap"] == 0.0, name
    assert (tmp_path / "v" / "suite_validity.png").stat().st_size > 0
