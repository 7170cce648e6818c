"""The artifact contract, the error contract and the console script."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from tools.artifact import MANIFEST, Lineage, Stage, read_artifact
from tools.errors import UserError


def _copy_stage(src, out, *, force=False, lineage=None, calls=None):
    with Stage("test.copy", out, {"upper": True}, inputs=[src], force=force, lineage=lineage) as st:
        if st.skipped:
            return st.result
        if calls is not None:
            calls.append(1)
        st.path("data.txt").write_text(src.read_text().upper() if src.is_file() else "dir")
    return st.result


def test_manifest_records_inputs_outputs_and_params(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    art = _copy_stage(src, tmp_path / "out")
    m = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert m["stage"] == "test.copy"
    assert m["params"] == {"upper": True}
    assert m["inputs"][0]["sha256"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert m["outputs"] == [{"path": "data.txt", "sha256": art.manifest["outputs"][0]["sha256"], "size": 5}]
    assert (tmp_path / "out" / "data.txt").read_text() == "HELLO"


def test_identical_inputs_skip_changed_byte_reruns(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    calls = []
    _copy_stage(src, tmp_path / "out", calls=calls)
    _copy_stage(src, tmp_path / "out", calls=calls)
    assert len(calls) == 1, "identical inputs and parameters must skip"
    _copy_stage(src, tmp_path / "out", calls=calls, force=True)
    assert len(calls) == 2, "--force re-runs"
    src.write_text("hellp")  # one byte changed
    _copy_stage(src, tmp_path / "out", calls=calls)
    assert len(calls) == 3
    assert (tmp_path / "out" / "data.txt").read_text() == "HELLP"


def test_failed_stage_leaves_no_output(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    with pytest.raises(RuntimeError):
        with Stage("test.fail", tmp_path / "out", {}, inputs=[src]) as st:
            st.path("half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [src]


def test_killed_stage_is_never_read_as_complete(tmp_path):
    """SIGKILL a stage after it wrote outputs but before its manifest: the folder is not an artifact."""
    src = tmp_path / "in.txt"
    src.write_text("x")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, time, pathlib
        from tools.artifact import Stage
        with Stage("test.slow", {str(out)!r}, {{}}, inputs=[{str(src)!r}]) as st:
            st.path("big.txt").write_text("partial")
            print("written", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "written"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    leftovers = [x.name for x in tmp_path.iterdir() if x.name != "in.txt"]
    assert leftovers and all(x.startswith(".out.partial-") for x in leftovers)
    with pytest.raises(UserError, match="artifact folder not found"):
        read_artifact(out)
    # even a folder holding all outputs but no manifest is refused
    (out).mkdir()
    (out / "big.txt").write_text("complete-looking")
    with pytest.raises(UserError, match="no manifest.json"):
        read_artifact(out)
    # such a folder is not ours to replace: refused, untouched
    with pytest.raises(UserError, match=r"\[--out\]: is a folder with files but no manifest.json"):
        with Stage("test.slow", out, {}, inputs=[src]):
            pass
    assert (out / "big.txt").read_text() == "complete-looking"
    # once it is gone (or empty), the next run does the work rather than skipping
    (out / "big.txt").unlink()
    calls = []
    with Stage("test.slow", out, {}, inputs=[src]) as st:
        if not st.skipped:
            calls.append(1)
            st.path("big.txt").write_text("done")
    assert calls == [1] and read_artifact(out).manifest["outputs"][0]["size"] == 4


def test_lineage_propagates_through_stages(tmp_path):
    src = tmp_path / "notes.csv"
    src.write_text("a")
    a = _copy_stage(src, tmp_path / "corpus", lineage=Lineage(credentialed=True, licenses={"PhysioNet-DUA"}))
    assert a.lineage.credentialed
    with Stage("test.second", tmp_path / "model", {}, inputs=[a.path]) as st:
        st.lineage.licenses.add("Apache-2.0")
        st.path("w.bin").write_bytes(b"0")
    b = read_artifact(tmp_path / "model")
    assert b.lineage.credentialed is True
    assert b.lineage.licenses == {"PhysioNet-DUA", "Apache-2.0"}
    # a change in the upstream artifact changes the downstream fingerprint
    with Stage("test.second", tmp_path / "model", {}, inputs=[a.path]) as st2:
        assert st2.skipped
    src.write_text("b")
    _copy_stage(src, tmp_path / "corpus")
    with Stage("test.second", tmp_path / "model", {}, inputs=[a.path]) as st3:
        assert not st3.skipped
        st3.path("w.bin").write_bytes(b"1")


def test_console_script_help_and_version(tools_cli):
    p = tools_cli("--help")
    assert p.returncode == 0 and "MediLoRA" in p.stdout
    v = tools_cli("--version")
    assert v.returncode == 0 and "0.1.0" in v.stdout


def test_user_error_is_one_line_exit_2(tools_cli, tmp_path):
    from click.testing import CliRunner

    from tools.cli import cli

    @cli.command("_test-bad-input", hidden=True)
    def _bad():
        raise UserError("missing field 'x'", path="data.jsonl", line=7)

    r = CliRunner().invoke(cli, ["_test-bad-input"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: data.jsonl:7: missing field 'x'"
    assert "Traceback" not in r.output

    @cli.command("_test-crash", hidden=True)
    def _crash():
        raise RuntimeError("disk on fire")

    r = CliRunner().invoke(cli, ["_test-crash"])
    assert r.exit_code == 1 and "disk on fire" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["--debug", "_test-crash"])
    assert r.exit_code == 1 and "Traceback" in r.output


def test_embedded_gguf_is_found(smollm2_gguf):
    assert smollm2_gguf.suffix == ".gguf" and smollm2_gguf.stat().st_size > 50_000_000
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_tiny_llama_has_chatml(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    s = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert s == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) == 1
