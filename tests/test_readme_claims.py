"""README says only what is true: its checkable claims are read from the text and compared with the Click tree
(`--json` per verb, which verbs write no artifact, the CLI map naming every verb and no other)."""
from __future__ import annotations

import re
from pathlib import Path

import click

from tools.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
ARCH = (Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


def verbs() -> dict[str, click.Command]:
    out = {}

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for n, c in cmd.commands.items():
                if not c.hidden:  # hidden verbs are test fixtures (tests/tools/test_foundation.py), not product
                    walk(c, [*path, n])
        else:
            out[" ".join(path)] = cmd
    walk(cli, [])
    return out


def _opts(cmd) -> set[str]:
    return {o for p in cmd.params for o in p.opts}


def _named(text: str) -> set[str]:
    """Verbs named in backticks in ``text`` (`chat`, `rag query`)."""
    return set(re.findall(r"`([a-z][a-z -]*[a-z])`", text))


def test_json_is_on_every_verb_but_the_ones_readme_names():
    m = re.search(r"`--json` \(every verb but (.+?)\)", README, re.S)
    assert m, "README no longer says which verbs lack --json"
    without = {v for v, c in verbs().items() if "--json" not in _opts(c)}
    assert _named(m.group(1)) == without
    m = re.search(r"`--json` \(all verbs but (.+?)\)", ARCH, re.S)
    assert m and _named(m.group(1)) == without


def test_artifact_verbs_are_all_but_the_ones_readme_names():
    m = re.search(r"Every verb that makes something writes one artifact folder \(all but (.+?), which", README, re.S)
    assert m, "README no longer lists the verbs without an artifact"
    # an artifact-writing verb takes --force (same inputs and parameters: nothing to do unless forced)
    without = {v for v, c in verbs().items() if "--force" not in _opts(c)}
    assert _named(m.group(1)) == without


def test_cli_map_names_every_verb_and_no_other():
    block = README.split("## CLI map", 1)[1].split("```", 2)[1]
    mapped = set()
    for line in block.splitlines():
        cmds = re.split(r"\s{2,}(?:tools|corpora|recipes|release|evals)/", line)[0]
        for seg in re.findall(r"tools ([^,]+)", cmds):
            words = seg.split()
            if isinstance(cli.commands.get(words[0]), click.Group):
                mapped |= {f"{words[0]} {sub}" for sub in words[1].split("|")}
            else:
                mapped |= {part.split()[0] for part in seg.split(" | ")}
    assert mapped == set(verbs()), (sorted(mapped - set(verbs())), sorted(set(verbs()) - mapped))
