"""Training that survives a kill, and training on several processes and "nodes", for real on CPU.

One SFT recipe on the tiny Llama (16 rows, global batch 4, 8 optimizer steps = 2 epochs, a
checkpoint every 2 steps, LoRA without dropout, one thread per process) is trained:

* once uninterrupted with 1 process (accumulation 2): the reference (a `tools train` forked from the
  test worker, its Axolotl too: tests/warm_axolotl.py);
* (a 1-process run killed and resumed is tests/tools/test_demo.py's: through the pipeline, with
  `tools status` and the dry runs asked before the resume);
* with 2 processes (DDP over gloo, accumulation 1: the same global batch), killed and resumed
  the same way: same samples at every step as the reference, every sample once per epoch, and the
  reference's losses and adapter within 1e-6 (measured: identical bytes);
* with 2 torchrun "nodes" on loopback: the stage's own launch.sh started twice, one adapter,
  recorded with `tools train --adopt`, again equal to the reference within 1e-6.

Why the tolerance can be this tight: with one thread per process the CPU kernels sum in a fixed
order, gloo's all-reduce of two ranks is one addition, and the Trainer's loss scaling (x world
size, then DDP's mean) is exact in binary floating point. LoRA dropout is off because each rank
draws its own dropout masks (a legitimate difference, like another seed).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import VENV_BIN, assert_gone_after_kill, cut_off_checkpoint, make_dataset, run_tools, spawn_tools
from tools.artifact import read_artifact

RECIPE = ["--device", "cpu", "--lora", "--max-steps", "8", "--micro-batch", "2", "--no-packing", "--warmup-steps", "0",
          "--lr", "1e-2", "--lora-dropout", "0", "--set", "optimizer=adamw_torch", "--set", "save_steps=2"]
ROWS = 16
STEPS_PER_EPOCH = ROWS // 4
TOL = 1e-6


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _tools(*args, **extra) -> subprocess.CompletedProcess:
    """`tools ARGS` with one thread (forked from the worker: tests.helpers.run_tools; its several processes are real)."""
    return run_tools(*args, env={"OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}, timeout=600)


def _train_and_kill(stage: Path, **extra) -> None:
    """`tools train STAGE` in its own process group, SIGKILLed (the group) once a checkpoint with
    trainer_state.json exists; then nothing of it may go on running."""
    p = spawn_tools("train", stage, env={"OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}})
    t0 = time.time()
    try:
        while not list((stage / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert p.poll() is None, f"tools train ended before its first checkpoint:\n{p.stderr_text()[-3000:]}"
            assert time.time() - t0 < 400, "no checkpoint after 400 s"
            time.sleep(0.1)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.close()
    assert_gone_after_kill(stage)


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


def _losses(hist: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in hist if "loss" in h}


def _trace(d: Path, upto: int | None = None, after: int | None = None) -> dict[int, list[str]]:
    """Rows (digests of their token ids) trained at each optimizer step, over all ranks."""
    steps: dict[int, list[str]] = {}
    for f in sorted(d.glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if (upto is None or r["step"] <= upto) and (after is None or r["step"] > after):
                steps.setdefault(r["step"], []).extend(r["rows"])
    return steps


def _check_epochs(steps: dict[int, list[str]], all_rows: set[str]) -> None:
    assert sorted(steps) == list(range(1, 9))
    for e in range(2):
        seen = [r for s in range(1 + e * STEPS_PER_EPOCH, 1 + (e + 1) * STEPS_PER_EPOCH) for r in steps[s]]
        assert len(seen) == ROWS and set(seen) == all_rows, f"epoch {e + 1}: every sample exactly once"


def _close_to_reference(out: Path, ref: dict) -> None:
    import torch

    e = read_artifact(out, stage="train").extra
    assert [h["step"] for h in e["log_history"] if "loss" in h] == list(range(1, 9))
    got = _losses(e["log_history"])
    for s, v in ref["losses"].items():
        assert abs(got[s] - v) <= TOL * abs(v), (s, got[s], v)
    a = _adapter(out)
    assert a.keys() == ref["adapter"].keys()
    diff = max((a[k].float() - ref["adapter"][k].float()).abs().max().item() for k in a)
    assert diff <= TOL, diff
    assert any(torch.count_nonzero(t) for t in a.values())


def _stage_like_reference(reference: dict, tiny_llama: Path, name: str, flag: str) -> tuple[Path, str]:
    """The reference's recipe as a 2-way stage (`flag`: --procs or --nodes, accumulation 1): (stage, launch.sh)."""
    stage = reference["root"] / name
    r = _tools("stage", "sft", "--base-model", tiny_llama, "--dataset", reference["data"], "--out", stage,
               "--grad-accum", "1", flag, "2", *RECIPE)
    assert r.returncode == 0, r.stderr
    return stage, (stage / "launch.sh").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    """The uninterrupted 1-process run, traced: adapter, losses, samples per step, all rows."""
    root = tmp_path_factory.mktemp("dist")
    data = make_dataset(root / "data", n=ROWS)
    stage = root / "one"
    r = _tools("stage", "sft", "--base-model", tiny_llama, "--dataset", data, "--out", stage, "--grad-accum", "2",
               *RECIPE)
    assert r.returncode == 0, r.stderr
    trace = root / "trace-one"
    # a forked `tools train` whose one-process Axolotl is a fork of this worker too (tests/warm_axolotl.py): the
    # 2-process and 2-node runs below, all real processes, must match it bit for bit
    r = _tools("train", stage, MEDILORA_TRACE_SAMPLES=trace)
    assert r.returncode == 0, r.stderr[-3000:]
    out = read_artifact(stage / "output", stage="train")
    import hashlib

    from datasets import load_from_disk

    prepared = [p for p in sorted((stage / "prepared").iterdir()) if p.is_dir()]
    rows = load_from_disk(str(prepared[0]))
    # the digest recipes/seeding/sitecustomize.py writes for each trained row
    all_rows = {hashlib.sha1(",".join(map(str, x["input_ids"])).encode()).hexdigest()[:16] for x in rows}
    assert len(rows) == len(all_rows) == ROWS
    steps = _trace(trace)
    _check_epochs(steps, all_rows)
    return {"root": root, "data": data, "stage": stage, "adapter": _adapter(stage / "output"),
            "adapter_bytes": (stage / "output" / "adapter_model.safetensors").read_bytes(),
            "losses": _losses(out.extra["log_history"]), "history": out.extra["log_history"], "steps": steps,
            "all_rows": all_rows, "extra": out.extra}


@pytest.mark.slow
def test_two_processes_train_data_parallel_and_resume(reference, tiny_llama):
    root = reference["root"]
    stage, launch = _stage_like_reference(reference, tiny_llama, "two", "--procs")
    assert "--launcher accelerate -- --multi_gpu --num_processes 2" in launch and "ACCELERATE_USE_CPU=true" in launch
    trace = root / "trace-two"
    _train_and_kill(stage, MEDILORA_TRACE_SAMPLES=trace / "killed")
    k, bad = cut_off_checkpoint(stage, "rng_state_1.pth", 2)  # rank 0 wrote trainer_state.json before rank 1's RNG

    r = _tools("train", stage, MEDILORA_TRACE_SAMPLES=trace / "resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    err = " ".join(r.stderr.split())
    assert f"skipping {bad}: cut off mid-write (no rng_state_1.pth)" in err and f"resuming from step {k} " in err
    out = read_artifact(stage / "output", stage="train")
    assert out.manifest["extra"]["world_size"] == 2 and out.extra["resumed_from_step"] == k
    # data parallel: the global batch of every step holds the reference's samples, every sample once an epoch
    steps = {**_trace(trace / "killed", upto=k), **_trace(trace / "resumed", after=k)}
    assert {r["rank"] for f in (trace / "resumed").glob("rank-*.jsonl")
            for r in map(json.loads, f.read_text().splitlines())} == {0, 1}
    _check_epochs(steps, reference["all_rows"])
    assert {s: sorted(v) for s, v in steps.items()} == {s: sorted(v) for s, v in reference["steps"].items()}
    _close_to_reference(stage / "output", reference)


@pytest.mark.slow
def test_two_nodes_on_loopback_run_the_stage_launch_script(reference, tiny_llama):
    root = reference["root"]
    stage, launch = _stage_like_reference(reference, tiny_llama, "nodes", "--nodes")
    assert "--launcher torchrun -- --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in launch
    r = _tools("train", stage)
    assert r.returncode == 2 and "launch.sh on every node" in r.stderr
    pre = subprocess.run(["bash", str(stage / "launch.sh"), "preprocess"], env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert pre.returncode == 0, pre.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trace = root / "trace-nodes"
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID=f"t{port}", MEDILORA_TRACE_SAMPLES=trace)
    logs = [open(root / f"node{i}.log", "w") for i in range(2)]
    nodes = [subprocess.Popen(["bash", str(stage / "launch.sh"), "train"], env=env, stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True) for f in logs]
    try:
        rcs = [n.wait(timeout=600) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
        for f in logs:
            f.close()
    assert rcs == [0, 0], (root / "node0.log").read_text()[-3000:] + (root / "node1.log").read_text()[-3000:]
    steps = _trace(trace)
    assert {json.loads(x)["rank"] for f in trace.glob("rank-*.jsonl") for x in f.read_text().splitlines()} == {0, 1}
    _check_epochs(steps, reference["all_rows"])
    assert {s: sorted(v) for s, v in steps.items()} == {s: sorted(v) for s, v in reference["steps"].items()}
    r = _tools("train", stage, "--adopt")
    assert r.returncode == 0, r.stderr[-3000:]
    out = read_artifact(stage / "output", stage="train")
    assert out.extra["world_size"] == 2 and out.extra["adopted"] is True
    assert {"adapter_model.safetensors", "log_history.json"} <= set(out.outputs())
    _close_to_reference(stage / "output", reference)


def test_checkpoint_completeness_and_lock(tmp_path, tiny_llama):
    """What counts as a whole checkpoint (no training: files made here), and one `tools train` a stage."""
    import torch
    from safetensors.torch import save_file

    from recipes.train import checkpoint_problem, last_checkpoint

    def make(step: int, world: int = 1) -> Path:
        c = tmp_path / "ck" / f"checkpoint-{step}"
        c.mkdir(parents=True)
        save_file({"w": torch.ones(4, 4)}, str(c / "adapter_model.safetensors"))
        torch.save({"state": {0: torch.zeros(8)}}, c / "optimizer.pt")
        torch.save({"last_epoch": step}, c / "scheduler.pt")
        for r in range(world):
            torch.save({"python": 1}, c / ("rng_state.pth" if world == 1 else f"rng_state_{r}.pth"))
        (c / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        return c

    c2, c4 = make(2), make(4)
    assert checkpoint_problem(c2) is None and checkpoint_problem(c4) is None
    assert last_checkpoint(tmp_path / "ck") == (4, c4)
    cases = {
        "trainer_state.json": "no trainer_state.json",
        "optimizer.pt": "optimizer.pt: not a whole torch file",
        "adapter_model.safetensors": "adapter_model.safetensors: 96 bytes, its header needs 136",
        "rng_state.pth": "no rng_state.pth",
    }
    for name, why in cases.items():
        c = make(6)
        f = c / name
        if name == "rng_state.pth" or name == "trainer_state.json":
            f.unlink()
        else:
            f.write_bytes(f.read_bytes()[:-40])
        assert checkpoint_problem(c).startswith(why), (name, checkpoint_problem(c))
        assert last_checkpoint(tmp_path / "ck") == (4, c4) and not c.exists()  # skipped and removed
    c = make(6)
    (c / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    assert "not at step 6" in checkpoint_problem(c)
    shutil.rmtree(c)
    c = make(8, world=2)
    assert checkpoint_problem(c, 2) is None and "rng_state_0.pth, rng_state_1.pth" in checkpoint_problem(make(10), 2)
    # what launch.sh asks before it trains (several nodes read the same folder: nothing is removed)
    r = subprocess.run([str(VENV_BIN / "python"), "-m", "recipes.train", "--last-checkpoint", str(tmp_path / "ck"), "2"],
                       capture_output=True, text=True, env=_env(), cwd=str(Path(__file__).resolve().parents[2]))
    assert r.returncode == 0 and r.stdout.strip() == str(c), r.stderr
    assert "skipping checkpoint-10: cut off mid-write" in r.stderr and (tmp_path / "ck" / "checkpoint-10").exists()

    # `tools run`/`tools status` ask `tools train --dry-run --json` (the kill test above checks the step they
    # name); nothing to ask for a --restart step or another verb
    from tools.pipeline import resume_note
    assert resume_note(["train", str(tmp_path / "st"), "--restart"]) == "" == resume_note(["merge", "x"])

    # a second `tools train` on a stage being trained is refused before it touches anything
    import fcntl

    from recipes.stage import StageSpec, write_stage
    data = make_dataset(tmp_path / "data", n=4)
    st = write_stage(StageSpec("sft", tmp_path / "s", base_model=str(tiny_llama), data=[str(data)], device="cpu",
                               mode="lora", max_steps=1, procs=2))
    assert st.extra["world_size"] == 2 and st.extra["launcher"] == "accelerate"
    with open(tmp_path / "s" / ".train.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        r = _tools("train", tmp_path / "s")
    assert r.returncode == 2 and "another `tools train` is running on this stage" in r.stderr
    assert not (tmp_path / "s" / "output").exists() and not (tmp_path / "s" / "checkpoints").exists()
