"""The CLI as a whole: every verb listed by `tools --help`, every verb's --help with an example."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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


# what `tools --help` must not load: the heavy backends (seconds), numpy, and rich (a fifth of the start);
# verbs import them when they run. Checked by name, not timed: a timing test flickers on a loaded machine.
START_FREE = ("torch", "transformers", "llama_cpp", "datasets", "accelerate", "peft", "axolotl", "numpy", "pandas",
              "matplotlib", "scipy", "sklearn", "faiss", "huggingface_hub", "safetensors", "jinja2", "yaml", "rich")


def test_help_loads_no_heavy_module():
    """`tools --help` in a fresh interpreter (the verbs registered, the verb map printed) imports none of
    START_FREE, so it starts well under 0.5 s."""
    code = ("import sys\nimport tools.cli\ntry:\n    tools.cli.cli.main(['--help'], prog_name='tools')\n"
            "except SystemExit:\n    pass\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=root,
                       env=env)
    loaded = set(p.stdout.split("\n")[-2].split())
    assert "tools" in loaded and "corpora" in loaded and "evals" in loaded
    assert not loaded & set(START_FREE), sorted(loaded & set(START_FREE))


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
