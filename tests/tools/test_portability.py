"""Runs on the machines users have: llama.cpp without AMX, the guard, the install's smoke check,
native crashes isolated to one test, and the CUDA install line."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def make_dry_run(*args: str) -> str:
    p = subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_native_crash_fails_only_that_test(pytester, monkeypatch):
    pytester.makepyfile(test_inner='''
        import os, signal
        import pytest

        @pytest.fixture(scope="session")
        def shared():
            return {"pid": os.getpid()}

        @pytest.mark.native
        def test_crashes(shared):
            assert shared["pid"] != os.getpid()  # the body runs in a child, the fixture in the parent
            os.kill(os.getpid(), signal.SIGSEGV)

        @pytest.mark.native
        def test_fails_with_its_assertion():
            assert 1 + 1 == 3, "arithmetic"

        @pytest.mark.native
        def test_native_passes(shared):
            assert shared["pid"] != os.getpid()

        def test_after_the_crash():
            assert True
    ''')
    env_pp = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    monkeypatch.setenv("PYTHONPATH", env_pp)
    res = pytester.runpytest_subprocess("-p", "tests.isolation", "-p", "no:cacheprovider", "-q")
    res.assert_outcomes(passed=2, failed=2)
    out = res.stdout.str()
    assert "died with SIGSEGV" in out
    assert "arithmetic" in out
    assert "Fatal Python error" not in out + res.stderr.str()


def test_smoke_check_passes_here():
    p = subprocess.run([sys.executable, "-m", "evals.smoke"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "smoke check passed" in p.stdout and "AMX in build: no" in p.stdout, p.stdout


def test_smoke_check_reports_a_crash_in_one_line():
    env = {**os.environ, "MEDILORA_SMOKE_SELFTEST": "segv", "PYTHONFAULTHANDLER": "1"}
    p = subprocess.run([sys.executable, "-m", "evals.smoke"], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=600)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: llama.cpp smoke check failed") and "SIGSEGV" in lines[0]
    assert "decode step" in lines[0] and "make install" in lines[0]


def test_amx_guard_decision():
    from tools.llamacpp import amx_guard_needed, cpu_flags

    amx_build = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    plain_build = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | REPACK = 1 |"
    spr = cpu_flags("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n\n")
    epyc = cpu_flags("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni\n\n")
    assert "amx_tile" in spr and "amx_tile" not in epyc
    assert amx_guard_needed(amx_build, spr, env={}) is True
    assert amx_guard_needed(amx_build, epyc, env={}) is False
    assert amx_guard_needed(plain_build, spr, env={}) is False
    assert amx_guard_needed(amx_build, spr, env={"MEDILORA_LLAMA_AMX": "1"}) is False


def test_installed_llama_cpp_has_no_amx_and_keeps_repacking():
    from tools.llamacpp import built_with_amx, system_info

    info = system_info()
    assert not built_with_amx(info), info
    assert "REPACK = 1" in info, info  # the CPU weight-repacking speed-ups stay
    assert "OPENMP = 1" not in info, info  # ggml's own thread pool: nothing shared with torch's libgomp


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_build_flags_leave_amx_out_on_an_amx_cpu():
    """The build's flags on top of a Sapphire Rapids target: no AMX macro, AVX-512/VNNI/BF16 kept."""
    out = make_dry_run("llama-cpp", "GPU=cpu")
    m = re.search(r'CFLAGS="([^"]*)"', out)
    assert m and "-mno-amx-int8" in m.group(1), out
    cc = shutil.which("cc") or shutil.which("gcc")
    macros = subprocess.run([cc, "-march=sapphirerapids", *m.group(1).split(), "-dM", "-E", "-"], input="",
                            capture_output=True, text=True, check=True).stdout
    assert "__AMX_INT8__" not in macros and "__AMX_TILE__" not in macros
    for kept in ("__AVX512F__", "__AVX512VNNI__", "__AVX512BF16__", "__AVXVNNI__"):
        assert kept in macros, kept
    plain = subprocess.run([cc, "-march=sapphirerapids", "-dM", "-E", "-"], input="", capture_output=True,
                           text=True, check=True).stdout
    assert "__AMX_INT8__" in plain  # what -march=native alone gives on such a CPU


def test_the_build_log_shows_every_cpu_file_compiled_without_amx():
    log = Path(sys.prefix) / "llama-cpp-build.log"
    assert log.is_file(), "make install keeps llama.cpp's build log in the venv"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "ggml-cpu" in ln and " -c " in ln]
    assert lines, "no ggml-cpu compile line in the build log"
    assert all("-mno-amx-int8" in ln and "-march=native" in ln for ln in lines)


@pytest.fixture
def torch_pool_used_in_parent():
    """torch's OpenMP pool started with 2 threads in the pytest process, before the fork."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.mm(torch.ones(512, 512), torch.ones(512, 512))
    yield
    torch.set_num_threads(before)


@pytest.mark.native(timeout=120)
def test_llama_in_a_forked_child_after_torch_threads(torch_pool_used_in_parent, smollm2_gguf):
    """An OpenMP llama.cpp would share torch's libgomp and hang here at its first barrier."""
    from tools.llm import LlamaRunner

    with LlamaRunner(smollm2_gguf, n_ctx=256, n_threads=2) as lr:
        toks = lr.tokenize(lr.render("You are a doctor.", "Is aspirin an antiplatelet drug?"))
        (lp, _), = lr.score(toks, [lr.llm.tokenize(b"yes", add_bos=False, special=False)])
    assert -1e4 < lp < 0


@pytest.mark.native
def test_guarded_load_scores_like_the_plain_load(smollm2_gguf, monkeypatch):
    """The guard's path (no extra buffer types) loads and scores the same as the default path."""
    import tools.llamacpp as lc
    from tools.llm import LlamaRunner

    def scores(guard: bool):
        monkeypatch.setattr(lc, "amx_guard_needed", lambda info, flags, env=None: guard)
        with LlamaRunner(smollm2_gguf, n_ctx=256, n_threads=1) as lr:
            assert lr.amx_guard is guard and lr.n_gpu_layers == 0
            toks = lr.tokenize(lr.render("You are a doctor.", "Is aspirin an antiplatelet drug?"))
            conts = [lr.llm.tokenize(w.encode(), add_bos=False, special=False) for w in ("yes", "no", "maybe")]
            return [s for s, _ in lr.score(toks, conts)]

    a, b = scores(False), scores(True)
    assert a == pytest.approx(b, abs=0.05)
    assert max(range(3), key=a.__getitem__) == max(range(3), key=b.__getitem__)


def test_cuda_install_dry_run():
    out = make_dry_run("install", "GPU=cuda")
    assert "-DGGML_CUDA=on" in out
    assert "download.pytorch.org/whl/cu" in out and "bitsandbytes" in out
    assert "-mno-amx-int8" in out  # the CUDA build's CPU backend leaves AMX out too
    cpu = make_dry_run("install")
    assert "-DGGML_CUDA" not in cpu and "-mno-amx-int8" in cpu and "torch==2.13.0" in cpu


@pytest.mark.parametrize("verb", [("bench", "pubmedqa"), ("bench", "medqa"), ("eval", "mmlu-medical"),
                                  ("eval", "perplexity"), ("compare-quant",)])
def test_gguf_verbs_take_n_gpu_layers(verb):
    from click.testing import CliRunner

    from tools.cli import cli

    r = CliRunner().invoke(cli, [*verb, "--help"])
    assert r.exit_code == 0 and "--n-gpu-layers" in r.output, r.output


def test_bench_records_gpu_layers(tmp_path, tools_cli):
    p = tools_cli("bench", "pubmedqa", "--limit", "2", "--mode", "loglik", "--out", tmp_path / "b", "--json",
                  check=True)
    assert json.loads(p.stdout)["results"]["n_gpu_layers"] == 0  # no GPU backend in this build
