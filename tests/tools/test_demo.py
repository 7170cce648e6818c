"""A reduced demo pipeline end to end on the tiny Llama, then a run SIGKILLed in the middle
of a training step, resumed by the next `tools run`, finishing with outputs identical to the
uninterrupted run (same seed). The pipeline is content-addressed: once the resumed training has
been merged into the very same bytes, the steps after the merge are not run again."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools.artifact import read_artifact
from tools.io import sha256_file

pytestmark = pytest.mark.slow

PIPELINE = """
name: demo-reduced
vars:
  items: "3"
steps:
  - name: base
    run: base-model --tiny --seed 3
  - name: pubmedqa
    run: build-dataset pubmedqa
  - name: sft
    run: >-
      stage sft --base-model {steps.base.out} --dataset {steps.pubmedqa.out} --device cpu --lora
      --max-steps 6 --micro-batch 1 --grad-accum 1 --seq-len 1024 --warmup-steps 0 --lr 1e-3 --no-packing
      --set logging_steps=1
  - name: train
    run: train {steps.sft.out}
  - name: merged
    run: merge {steps.sft.out}
  - name: f16
    run: convert {steps.merged.out} --outtype f16
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


def test_demo_pipeline_resumes_after_sigkill_with_identical_outputs(tmp_path):
    pipe = tmp_path / "demo.yaml"
    pipe.write_text(textwrap.dedent(PIPELINE))
    run = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(_tools() + ["run", str(pipe), "--run-dir", str(run)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    first = _fingerprints(run)
    assert any(k.endswith(".gguf") for k in first) and "bench/items.jsonl" in first
    trained = read_artifact(run / "sft" / "output")
    assert trained.extra["adapter"] and trained.extra.get("log_history")

    # second run: drop the training output, then SIGKILL mid-training
    shutil.rmtree(run / "sft" / "output")
    log = run / "sft" / "train.log"
    log.unlink(missing_ok=True)
    p = subprocess.Popen(_tools() + ["run", str(pipe), "--run-dir", str(run)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if log.exists() and "'loss'" in log.read_text(errors="replace"):
            break  # at least one optimizer step logged: training is under way
        if p.poll() is not None:
            pytest.fail(f"run ended before training started: {p.stderr.read()[-2000:]}")
        time.sleep(0.2)
    else:
        pytest.fail("training never started")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "sft" / "output" / "manifest.json").exists(), "a killed training run must leave no manifest"

    # third run: earlier steps are skipped, training resumes and re-runs, outputs match the uninterrupted run
    r = subprocess.run(_tools() + ["run", str(pipe), "--run-dir", str(run)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("base", "pubmedqa", "sft"):
        assert f"[done] {step}" in r.stderr
    assert "[run ] train" in r.stderr and "resuming from step" in r.stderr
    assert read_artifact(run / "sft" / "output").extra["resumed_from_step"] >= 1
    # the trainer's own files (training_args.bin holds a time-stamped logging_dir) make the training
    # artifact new, so the merge runs again; it gives the same bytes, so nothing after it runs
    assert "[run ] merged" in r.stderr
    for step in DOWNSTREAM[1:]:
        assert f"[done] {step} (skipped: same command and inputs)" in r.stderr, r.stderr[-3000:]
    assert _fingerprints(run) == first
    st = subprocess.run(_tools() + ["status", str(run)], env=env, capture_output=True, text=True)
    assert st.returncode == 0 and st.stdout.count("done") >= 9
