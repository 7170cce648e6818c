"""Fingerprints come from a normalised spec: a renamed parameter (declared in the stage's SpecRule) keeps old
runs' fingerprints, so they are found up to date; a new parameter at its neutral value changes nothing."""
from __future__ import annotations

from tools.artifact import SpecRule, Stage


def _run(out, params, rule=None):
    with Stage("test.rename", out, params, spec_rule=rule) as st:
        if st.skipped:
            return st, True
        st.path("out.txt").write_text(repr(sorted(params.items())))
    return st, False


def test_a_declared_rename_keeps_the_fingerprint_and_the_run(tmp_path):
    first, skipped = _run(tmp_path / "a", {"max_tokens": 16, "seed": 0})
    assert not skipped
    # the code renames max_tokens -> max_new_tokens and declares it: the old run is up to date
    rule = SpecRule(renamed={"max_new_tokens": "max_tokens"})
    again, skipped = _run(tmp_path / "a", {"max_new_tokens": 16, "seed": 0}, rule)
    assert skipped and again.fingerprint == first.fingerprint
    # an undeclared rename is another spec (the stage runs again): the rule is what keeps it
    other, skipped = _run(tmp_path / "b", {"max_new_tokens": 16, "seed": 0})
    assert other.fingerprint != first.fingerprint
    # the value still counts
    changed, _ = _run(tmp_path / "c", {"max_new_tokens": 17, "seed": 0}, rule)
    assert changed.fingerprint != first.fingerprint


def test_a_new_parameter_at_its_neutral_value_keeps_the_fingerprint(tmp_path):
    first, _ = _run(tmp_path / "a", {"seed": 0})
    rule = SpecRule(defaults={"shots": 0})
    same, skipped = _run(tmp_path / "a", {"seed": 0, "shots": 0}, rule)
    assert skipped and same.fingerprint == first.fingerprint
    three, _ = _run(tmp_path / "b", {"seed": 0, "shots": 3}, rule)
    assert three.fingerprint != first.fingerprint
