"""The ground floor asks the stage: after a training run is killed (and a newer checkpoint was cut off
mid-write), `tools train --dry-run --json`, `tools run --dry-run` and `tools status` name the step that
`tools train` then really resumes from; a pipeline file needs no `out:` / `out_flag:` / `after:`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import VENV_BIN, cut_off_checkpoint, make_dataset

pytestmark = pytest.mark.slow


def _env() -> dict:
    return dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1", COLUMNS="250")


def _tools(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "tools"), *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=600)


def _kill_after_first_checkpoint(stage: Path) -> None:
    p = subprocess.Popen([str(VENV_BIN / "tools"), "train", str(stage)], env=_env(), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while not list((stage / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert p.poll() is None, "tools train ended before its first checkpoint"
            assert time.time() - t0 < 400, "no checkpoint after 400 s"
            time.sleep(0.1)
        time.sleep(0.5)  # let the checkpoint's files land
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_status_names_the_step_train_resumes_from(tmp_path, tiny_llama):
    data = make_dataset(tmp_path / "data", n=16)
    stage = tmp_path / "stage"
    r = _tools("stage", "sft", "--base-model", tiny_llama, "--dataset", data, "--out", stage, "--device", "cpu",
               "--lora", "--max-steps", "6", "--micro-batch", "2", "--grad-accum", "1", "--no-packing",
               "--warmup-steps", "0", "--set", "save_steps=1", "--set", "optimizer=adamw_torch")
    assert r.returncode == 0, r.stderr
    pipe = tmp_path / "p.yaml"
    pipe.write_text(textwrap.dedent(f"""
        steps:
          - name: train
            run: train {stage}
          - name: merged
            run: merge {stage}
    """))
    run = tmp_path / "run"
    assert _tools("run", pipe, "--run-dir", run, "--until", "train").returncode == 0  # trains it once
    state = json.loads((run / "run.json").read_text())
    assert state["steps"]["train"]["argv"][-2:] == ["--out", str((stage / "output").resolve())]

    shutil.rmtree(stage / "output")  # the same stage trained again, killed after a checkpoint
    _kill_after_first_checkpoint(stage)
    k, _ = cut_off_checkpoint(stage, "adapter_model.safetensors")  # newer, cut off: a rule that only
    # looks for trainer_state.json would name its step

    asked = json.loads(_tools("train", stage, "--dry-run", "--json").stdout)["results"]["resume_from_step"]
    dry = _tools("run", pipe, "--run-dir", run, "--dry-run")
    status = _tools("status", run)
    note = f"resumes from its checkpoint at step {k}"
    assert asked == k
    assert note in dry.stdout and "merge" in dry.stdout, dry.stdout + dry.stderr
    assert note in " ".join(status.stdout.split()), status.stdout
    assert f"step {k + 1}" not in dry.stdout + status.stdout

    r = _tools("train", stage)  # what it really does
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {k} " in " ".join(r.stderr.split())
