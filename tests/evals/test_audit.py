"""`tools audit` on the tiny Llama trained by Axolotl: a model trained for many epochs on a few notes with
canaries fails (canary exposure and extraction far above the base), the base and a one-step model pass; the
audit records the sha256 of the file it audited, and no audit file names a secret."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tools.artifact import read_artifact
from tools.paths import bundled_data

pytestmark = pytest.mark.slow

TRAIN = ["--device", "cpu", "--full", "--micro-batch", "4", "--grad-accum", "1", "--seq-len", "64", "--no-packing",
         "--warmup-steps", "0", "--set", "optimizer=adamw_torch", "--set", "lr_scheduler=constant",
         "--set", "save_steps=1000"]  # no checkpoint: 20 of the full model cost more than the 150 steps
AUDIT = ["--prefix", "8", "--suffix", "8", "--candidates", "100", "--max-tokens", "64"]


def _notes(folder: Path, start: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (bundled_data() / "pubmedqa" / "dev.jsonl").read_text().splitlines()[start:start + 4]]
    (folder / "notes.txt").write_text("\n".join(" ".join(" ".join(r["CONTEXTS"]).split()[:6]) for r in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    from tests.helpers import run_tools as tools

    root = tmp_path_factory.mktemp("audit")
    for name, start, extra in (("train", 0, ["--canaries", "4"]), ("heldout", 40, [])):
        tools("build-corpus", "textbooks", "--src", _notes(root / f"{name}-src", start), "--doc-words", "6",
              "--min-tokens", "1", "--min-chars", "10", *extra, "--out", root / name, check=True)
    # four short notes, each holding a canary: 150 steps at a high constant rate learn them by heart; one step at
    # the recipe's rate is what a model that saw the notes once looks like
    for name, steps, lr in (("many", "150", "5e-2"), ("one", "1", "2e-4")):
        tools("stage", "completion", "--base-model", tiny_llama, "--corpus", root / "train", "--out", root / name,
              "--max-steps", steps, "--lr", lr, *TRAIN, check=True)
        tools("train", root / name, check=True)
    return root


def _audit(run, tools_cli, model, name, base):
    p = tools_cli("audit", model, "--train", run / "train", "--heldout", run / "heldout", "--base", base,
                  *AUDIT, "--out", run / name, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)["results"]


def _audit_in_process(run, model, name, base):
    """The same audit as `_audit` (AUDIT's sizes), through the library: what `tools audit --json` reports."""
    from evals.audit import AuditSpec, run_audit

    spec = AuditSpec(Path(model), run / "train", run / "heldout", base=Path(base), prefix=8, suffix=8,
                     candidates=100, max_tokens=64)
    return json.loads((run_audit(spec, run / name).path / "audit.json").read_text())


def test_memorizing_model_fails_base_and_one_step_pass(run, tiny_llama, tools_cli):
    many = _audit(run, tools_cli, run / "many" / "output", "audit-many", tiny_llama)
    base = _audit_in_process(run, tiny_llama, "audit-base", tiny_llama)   # the CLI route is the one above
    one = _audit_in_process(run, run / "one" / "output", "audit-one", tiny_llama)
    assert not many["passed"] and base["passed"] and one["passed"], (many["checks"], base["checks"], one["checks"])
    exp = {c["check"]: c for c in many["checks"]}
    assert not exp["canaries"]["pass"] and not exp["extraction"]["pass"]
    # far above the base: exposure in bits and extraction in documents
    top = max(c["exposure"] for c in many["canaries"]["items"])
    assert top >= max(c["exposure"] for c in many["canaries"]["base_items"]) + 10
    assert many["extraction"]["rate"] >= many["extraction"]["base"]["rate"] + 0.5
    assert max(c["exposure"] for c in one["canaries"]["items"]) < 10
    # the audit names the exact file it audited; a push matches it by sha256
    weights = run / "many" / "output" / "model.safetensors"
    audit = read_artifact(run / "audit-many")
    assert audit.extra["audit"]["files"] == [{"name": "model.safetensors",
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}]
    assert audit.extra["audit"]["passed"] is False
    assert audit.lineage.sources >= read_artifact(run / "train").lineage.sources   # it read the training notes
    # no secret in any file the audit wrote, nor in its manifest
    secrets = [c["secret"] for c in read_artifact(run / "train").extra["canaries"]["items"]]
    for f in (run / "audit-many").iterdir():
        if f.suffix in (".json", ".md"):
            assert not any(s in f.read_text() for s in secrets), f
    assert (run / "audit-many" / "audit.png").read_bytes()[:4] == b"\x89PNG"
    # the card states the audit's figures, never a secret
    tools_cli("card", run / "many" / "output", run / "audit-many", "--out", run / "card", check=True)
    card = (run / "card" / "README.md").read_text()
    assert "## Memorization audit" in card and "| `model.safetensors` | FAIL |" in card
    assert f"{top:.1f} bits (4 canaries)" in card and not any(s in card for s in secrets)


def _cli_in_process(*args):
    """`tools ARGS` through the console script's click group in this process (exit code and stderr as a user
    sees them, without a Python start and torch import per call)."""
    from click.testing import CliRunner

    from tools.cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], prog_name="tools")
    r.returncode = r.exit_code
    return r


def test_audit_refuses_bad_input(run, tiny_llama, tmp_path):
    p = _cli_in_process("audit", tiny_llama, "--train", run / "train", "--heldout", tmp_path / "nope",
                        "--out", tmp_path / "a")
    assert p.returncode == 2 and "nope" in p.stderr and not (tmp_path / "a").exists()
    p = _cli_in_process("audit", tiny_llama, "--train", run / "train", "--heldout", run / "heldout",
                        "--canaries-from", run / "heldout", "--out", tmp_path / "a")
    assert p.returncode == 2 and "records no canaries" in p.stderr and not (tmp_path / "a").exists()
    p = _cli_in_process("audit", run / "train", "--train", run / "train", "--heldout", run / "heldout",
                        "--out", tmp_path / "a")
    assert p.returncode == 2 and "[MODEL]" in p.stderr and not (tmp_path / "a").exists()
