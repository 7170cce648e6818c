"""The test harness's warm Axolotl (tests/warm_axolotl.py) forks exactly the one-process Axolotl commands and
llama.cpp converters whose environment a fork reproduces; everything else stays a real process. (That a forked run trains the very
bytes of real processes is tests/recipes/test_train_distributed.py's reference, compared bit for bit with
real 2-process and 2-node runs.)"""
from __future__ import annotations

import os
import sys

from recipes.recipe import env_for_axolotl
from recipes.stage import StageSpec, write_stage
from recipes.train import plan
from tests.helpers import make_dataset
from tests.warm_axolotl import AXOLOTL, forkable


def test_only_one_process_commands_with_run_time_env_fork(tmp_path, tiny_llama):
    data = make_dataset(tmp_path / "data", n=4)
    one = plan(write_stage(StageSpec("sft", tmp_path / "one", base_model=str(tiny_llama), data=[str(data)],
                                     device="cpu", mode="lora", max_steps=1)).path)
    two = plan(write_stage(StageSpec("sft", tmp_path / "two", base_model=str(tiny_llama), data=[str(data)],
                                     device="cpu", mode="lora", max_steps=1, procs=2)).path)
    env = dict(env_for_axolotl(seed=42), MEDILORA_DIE_WITH_PARENT="1")
    [train] = one["commands"]
    assert train[0] == AXOLOTL and train[1] == "train"
    # a fork has this worker's hash seed: only where it is 0, the one every Axolotl process gets
    assert forkable(train, env) is (sys.flags.hash_randomization == 0)
    if sys.flags.hash_randomization == 0:
        assert forkable(train, dict(env, MEDILORA_TRACE_SAMPLES=str(tmp_path / "t")))   # read when Axolotl runs
        assert forkable([AXOLOTL, "merge-lora", "c.yaml", "--lora-model-dir", "x"], env)
    assert not forkable(train, dict(env, PYTHONHASHSEED="1"))
    assert not forkable(train, dict(env, HF_ENDPOINT="http://127.0.0.1:1"))   # read at import time
    assert not forkable(["axolotl", *train[1:]], env) and not forkable(train, None)
    assert not forkable([AXOLOTL, "inference", "c.yaml"], env)
    # llama.cpp's converters, with the environment release.llamasrc.run_script gives them
    from release.llamasrc import llama_cpp_dir
    conv = [sys.executable, str(llama_cpp_dir() / "convert_hf_to_gguf.py"), str(tiny_llama), "--outtype", "f16"]
    conv_env = dict(os.environ, PYTHONPATH=f"{llama_cpp_dir() / 'gguf-py'}{os.pathsep}{llama_cpp_dir()}")
    assert forkable(conv, conv_env) is (sys.flags.hash_randomization == 0)
    assert not forkable([sys.executable, str(tmp_path / "convert_hf_to_gguf.py")], conv_env)
    assert not forkable([sys.executable, "-m", "recipes.train"], conv_env)
    # several processes: accelerate launches them (real processes); their one preprocess forks, its CPU/DDP switches
    # are read when it runs
    pre, train2 = two["commands"]
    env2 = env_for_axolotl(seed=42, preset=None) | two["env"]
    assert "ACCELERATE_USE_CPU" in env2 and "--launcher" in train2 and pre[1] == "preprocess"
    assert not forkable(train2, env2)
    assert forkable(pre, env2) is (sys.flags.hash_randomization == 0)


def test_a_forked_converter_writes_the_bytes_of_a_real_one(tmp_path, tiny_llama, monkeypatch):
    """llama.cpp's converter on the tiny Llama, once forked from this worker, once as a real process."""
    import hashlib
    import subprocess

    from release.convert import convert_hf_to_gguf
    from tests.warm_axolotl import WarmPopen

    assert subprocess.Popen is WarmPopen   # tests/conftest.py installed it
    forked = convert_hf_to_gguf(tiny_llama, tmp_path / "forked.gguf", "f16", model_name="tiny")
    # (without xdist this process has a random hash seed: the first run was real too, `forkable` refused it)
    monkeypatch.setattr(subprocess, "Popen", WarmPopen.__mro__[1])
    real = convert_hf_to_gguf(tiny_llama, tmp_path / "real.gguf", "f16", model_name="tiny")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (forked, real)]
    assert digest[0] == digest[1]
