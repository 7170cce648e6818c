"""A reduced demo pipeline on the tiny Llama, SIGKILLed once training has written a checkpoint (and a
newer one is left cut off mid-write): the stage's dry run, `tools run --dry-run` and `tools status`
name the step the next `tools run` then really resumes from, and that run finishes the pipeline.
`tools train --restart` then trains uninterrupted (same seed) to the very bytes of the resumed run (that
a re-run step with the same bytes skips what follows is tests/tools/test_pipeline.py's). Every program
of the pipeline is a real process, as `make demo` runs them; the --restart training is the test harness's
fork of the worker (tests/warm_axolotl.py), so the identical bytes also show the fork trains as a real
process does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import assert_gone_after_kill, cut_off_checkpoint, run_tools
from tools.artifact import read_artifact
from tools.io import sha256_file

pytestmark = pytest.mark.slow

PIPELINE = """
name: demo-reduced
vars:
  items: "3"
  base: BASE
steps:
  - name: pubmedqa
    run: build-dataset pubmedqa
  - name: sft
    run: >-
      stage sft --base-model {vars.base} --dataset {steps.pubmedqa.out} --device cpu --lora
      --max-steps 6 --micro-batch 1 --grad-accum 1 --seq-len 1024 --warmup-steps 0 --lr 1e-3 --no-packing
      --set logging_steps=1 --set save_steps=2
  - name: train
    run: train {steps.sft.out}
  - name: merged
    run: merge {steps.sft.out}
  - name: f16
    run: convert {steps.merged.out} --outtype f16 --fidelity-tokens 0   # the gate: tests/release
  - name: q3kl
    run: quantize {steps.f16.out} --q Q3_K_L
  - name: bench
    run: bench pubmedqa --model {steps.q3kl.out} --limit {vars.items}
  - name: report
    run: report {steps.bench.out} --label tuned
"""

DOWNSTREAM = ("merged", "f16", "q3kl", "bench", "report")


def _fingerprints(run: Path) -> dict[str, str]:
    """sha256 of every data file the pipeline produced (manifests hold times, so they are left out)."""
    out = {}
    for step in ("sft/output", *DOWNSTREAM):
        art = read_artifact(run / step)
        for o in art.manifest["outputs"]:
            name = o["path"].rsplit("/", 1)[-1]
            if name.endswith((".png", ".md", ".log")) or name in ("results.json", "training_args.bin",
                                                                    "trainer_state.json"):
                # plots, reports and timings hold wall times; Axolotl's own bookkeeping files name the
                # temporary output folder. The weights, adapter config, optimizer state, log history,
                # GGUFs and the per-item answers are compared.
                continue
            out[f"{step}/{o['path']}"] = sha256_file(run / step / o["path"])
    return out


def _tools():
    return [str(Path(sys.executable).parent / "tools")]


def _run(pipe: Path, run: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_tools() + ["run", str(pipe), "--run-dir", str(run), *extra], env=env, capture_output=True,
                          text=True, timeout=1200)


def _kill_at_first_checkpoint(pipe: Path, run: Path, env: dict) -> Path:
    """`tools run` in its own process group, SIGKILLed (the group) once training has written a checkpoint."""
    stage = run / "sft"
    p = subprocess.Popen(_tools() + ["run", str(pipe), "--run-dir", str(run)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not list((stage / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        if p.poll() is not None:
            pytest.fail(f"run ended before a checkpoint: {p.stderr.read()[-2000:]}")
        assert time.time() < deadline, "no checkpoint after 600 s"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert_gone_after_kill(stage)
    return stage


def test_demo_pipeline_resumes_after_sigkill_with_identical_outputs(tmp_path, tiny_llama):
    pipe = tmp_path / "demo.yaml"
    pipe.write_text(textwrap.dedent(PIPELINE).replace("base: BASE", f"base: {tiny_llama}"))  # the session's tiny Llama
    run = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    # first run: SIGKILLed (the whole pipeline) once training has written a checkpoint
    stage = _kill_at_first_checkpoint(pipe, run, env)
    assert not (stage / "output" / "manifest.json").exists(), "a killed training run must leave no manifest"
    assert (stage / "checkpoints").stat().st_mode & 0o777 == 0o700
    k, bad = cut_off_checkpoint(stage, "adapter_model.safetensors")  # newer, cut off: a rule that only looks for
    # trainer_state.json would name its step

    # the ground floor asks the stage: the stage's dry run, `tools run --dry-run` and `tools status` name step k
    cols = dict(env, COLUMNS="250")
    asked = subprocess.run(_tools() + ["train", str(stage), "--dry-run", "--json"], env=env, capture_output=True,
                           text=True)
    dry = _run(pipe, run, cols, "--dry-run")
    status = subprocess.run(_tools() + ["status", str(run)], env=cols, capture_output=True, text=True)
    note = f"resumes from its checkpoint at step {k}"
    assert json.loads(asked.stdout)["results"]["resume_from_step"] == k
    assert note in dry.stdout and "merge" in dry.stdout, dry.stdout + dry.stderr
    assert note in " ".join(status.stdout.split()), status.stdout
    assert f"step {k + 1}" not in dry.stdout + status.stdout

    # second run: earlier steps are skipped, training resumes where the stage said, the pipeline finishes
    r = _run(pipe, run, env)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("pubmedqa", "sft"):
        assert f"[done] {step}" in r.stderr
    err = " ".join(r.stderr.split())
    assert "[run ] train" in err and f"skipping {bad}: cut off mid-write" in err and f"resuming from step {k} " in err
    resumed = read_artifact(stage / "output")
    assert resumed.extra["resumed_from_step"] == k and resumed.extra["world_size"] == 1
    assert [h["step"] for h in resumed.extra["log_history"] if "loss" in h] == list(range(1, 7))
    assert not (stage / "checkpoints").exists() and not list(stage.glob(".output.partial-*"))
    first = _fingerprints(run)
    assert any(k.endswith(".gguf") for k in first) and "bench/items.jsonl" in first
    # the step names no `out:`/`out_flag:`/`after:`: the pipeline gives `tools train` its --out
    state = json.loads((run / "run.json").read_text())
    assert state["steps"]["train"]["argv"][-2:] == ["--out", str((run / "sft" / "output").resolve())]
    st = subprocess.run(_tools() + ["status", str(run)], env=env, capture_output=True, text=True)
    assert st.returncode == 0 and st.stdout.count("done") >= 8, st.stdout

    # --restart: the uninterrupted training (and no second preprocess: the data was prepared for this stage) gives
    # the very bytes of the resumed one. This one `tools train` is forked from the worker, its Axolotl too
    # (tests/warm_axolotl.py): the harness's fork must train what real processes train
    r = run_tools("train", stage, "--restart", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" not in r.stderr and "preprocess: skipped" in r.stderr
    whole = read_artifact(stage / "output")
    assert whole.extra["resumed_from_step"] is None and whole.extra["log_history"] == resumed.extra["log_history"]
    assert _fingerprints(run) == first
