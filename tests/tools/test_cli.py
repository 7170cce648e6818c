"""The CLI as a whole: every verb listed by `tools --help`, every verb's --help with an example."""
from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from tools.cli import cli, verb_map


def leaf_verbs() -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(cli.commands.items()):
        if isinstance(cmd, click.Group):
            out += [(name, sub) for sub in sorted(cmd.commands)]
        else:
            out.append((name,))
    return out


def test_top_level_help_lists_every_verb():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    listed = " ".join(" ".join(v) for v in verb_map(cli).values())
    for verb in leaf_verbs():
        assert " ".join(verb) in listed
        assert " ".join(verb) in " ".join(r.output.split()), verb


@pytest.mark.parametrize("verb", leaf_verbs(), ids=" ".join)
def test_every_verb_help_has_an_example(verb):
    r = CliRunner().invoke(cli, [*verb, "--help"])
    assert r.exit_code == 0, r.output
    examples = [ln for ln in r.output.splitlines() if re.match(rf"\s*(Example:\s+)?tools {verb[0]}\b", ln)]
    assert examples, f"`tools {' '.join(verb)} --help` shows no example line"


def test_stage_and_bench_options_are_their_specs_fields():
    """StageSpec / BenchSpec are the single source of the stage and bench options: every option of those
    verbs is a field of the spec and every field an option (a new field without its option fails here)."""
    from evals.cli import bench_mcq, bench_medqa, bench_pubmedqa, check_bench_options
    from recipes.cli import check_stage_options, stage_completion, stage_sft

    for cmd in (stage_completion, stage_sft):
        check_stage_options(cmd)
    for cmd in (bench_pubmedqa, bench_medqa, bench_mcq):
        check_bench_options(cmd)
    with pytest.raises(AssertionError, match="lora_r"):
        check_stage_options(type(stage_sft)("sft", params=[p for p in stage_sft.params if p.name != "lora_r"]))
