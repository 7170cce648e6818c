"""Builders shared by several test files (test files never import each other): the console script
runner, small corpus / dataset artifacts made without corpora.*, a random LoRA adapter, a bench
artifact without a model, and reading a verb's `--json` output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tools.artifact import Stage
from tools.io import write_jsonl
from tools.paths import bundled_data, system_prompts_file

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


def run_tools(*args, check: bool = False, env: dict | None = None, cwd=None, timeout: int = 1800):
    """Run `tools ARGS` as a user would: the installed console script in a subprocess where the test sets an
    environment variable read at import time, else the same entry point in a forked child of this worker (see
    `run_forked`; ``env`` of variables read at run time only, tests.warm_axolotl.RUN_TIME_ENV, is set in the child)."""
    from tests.warm_axolotl import RUN_TIME_ENV

    argv = list(map(str, args))
    if set(env or {}) <= RUN_TIME_ENV and os.environ.get("MEDILORA_TEST_SUBPROCESS") != "1":
        p = run_forked(_tools_main(argv, env or {}), ["tools", *argv], cwd, timeout)
    else:
        e = dict(os.environ)
        e["PATH"] = f"{VENV_BIN}:{e.get('PATH', '')}"
        e.update(env or {})
        p = subprocess.run([str(VENV_BIN / "tools"), *argv], capture_output=True, text=True, env=e, cwd=cwd,
                           timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"tools {' '.join(argv)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


# Imported once per worker before the first fork, so that no forked `tools` pays for them again: most of a short
# verb's time in a fresh interpreter is importing these (torch + transformers ~6 s, llama_cpp, datasets, lm_eval).
_WARM = ("torch", "transformers", "peft", "datasets", "llama_cpp", "gguf", "safetensors", "lm_eval", "tools.cli")


def _warm() -> None:
    import importlib

    from tests import warm_axolotl

    for name in _WARM:
        if name not in sys.modules:
            importlib.import_module(name)
    warm_axolotl.warm()


def _tools_main(argv: list[str], env: dict):
    """The console script's entry point on ``argv``, ``env`` added to the environment (for `run_forked`)."""
    def main() -> None:
        from tools.cli import main as tools_main

        os.environ.update({k: str(v) for k, v in env.items()})
        if "OMP_NUM_THREADS" in env and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
        sys.argv = ["tools", *argv]
        tools_main()
    return main


def _child(main, cwd, out: int, err: int) -> None:
    """In the forked child: fds 1 and 2 to the capture files (tests.warm_axolotl.leave_the_worker), the venv first on
    PATH, then ``main()``."""
    from tests.warm_axolotl import leave_the_worker

    leave_the_worker((-1, out, err))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    os.environ["PATH"] = f"{VENV_BIN}:{os.environ.get('PATH', '')}"   # as for the subprocess: the venv's programs
    if cwd is not None:
        os.chdir(cwd)
    main()


def _fork(main, cwd, out: int, err: int, new_session: bool = False) -> int:
    """Fork; the child runs ``main()`` (see `_child`), in a session of its own if asked, and exits with its code."""
    from tests.warm_axolotl import run_then_exit

    _warm()
    pid = os.fork()
    if pid:
        return pid

    def body() -> None:
        if new_session:
            os.setsid()
        _child(main, cwd, out, err)
    run_then_exit(body)


def run_forked(main, cmd: list[str], cwd=None, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``main()`` (a program's entry point: `tools`, a bench/ script) in a forked child of this worker: its exit
    code, its own stdout and stderr (fds 1 and 2, so llama.cpp's and child processes' output too), without a new
    interpreter's start-up. ``cmd`` names the program in the result. Only for tests that set no environment
    variables read at import time."""
    import signal
    import tempfile
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = _fork(main, cwd, out.fileno(), err.fileno())
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


class Spawned:
    """`tools ARGS` running in a forked child in a session of its own (`spawn_tools`): killable as a group, as a
    real `tools` started with ``start_new_session=True``."""

    def __init__(self, argv: list[str], env: dict):
        import tempfile

        self._err = tempfile.TemporaryFile()
        with open(os.devnull, "wb") as null:
            self.pid = _fork(_tools_main(argv, env), None, null.fileno(), self._err.fileno(), new_session=True)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def stderr_text(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self) -> None:
        self._err.close()


def spawn_tools(*args, env: dict | None = None) -> Spawned:
    """Start `tools ARGS` (forked, in its own session) and return at once; ``env`` of run-time variables only."""
    from tests.warm_axolotl import RUN_TIME_ENV

    assert set(env or {}) <= RUN_TIME_ENV, f"read at import time: {set(env or {}) - RUN_TIME_ENV}"
    return Spawned(list(map(str, args)), env or {})


def run_bench(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python bench/NAME ARGS` from the repository root, as `make bench` runs it, in a forked child (`run_forked`)."""
    import runpy

    cmd = [str(REPO / "bench" / name), *map(str, args)]

    def main() -> None:
        sys.argv = cmd
        sys.path.insert(0, str(REPO / "bench"))   # what `python bench/NAME` puts first
        runpy.run_path(cmd[0], run_name="__main__")
    return run_forked(main, [sys.executable, *cmd], cwd=REPO, timeout=timeout)


def gguf_path(payload: dict) -> Path:
    """The GGUF file of a `--json` payload of convert / quantize (the artifact folder + extra.file)."""
    return Path(payload["path"]) / payload["manifest"]["extra"]["file"]


# -- artifact folders the corpora code would write (made here: these tests don't import corpora.*) --

def pubmedqa_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    with open(bundled_data() / "pubmedqa" / "dev.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(rows) >= n:
                break
            rows.append(json.loads(line))
    return rows


def make_corpus(out: Path, n: int = 24) -> Path:
    with Stage("corpus.test", out, {"n": n}) as st:
        if not st.skipped:
            write_jsonl(st.path("corpus.jsonl"), [{"id": d["id"], "text": " ".join(d["CONTEXTS"]),
                                                   "source": "pubmedqa"} for d in pubmedqa_rows(n)])
    return out


def chatml_row(d: dict, system: str) -> dict:
    return {"id": d["id"], "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{d['QUESTION']}\n{' '.join(d['CONTEXTS'])[:400]}"},
        {"role": "assistant", "content": d["final_decision"]}], "meta": {"answer": d["final_decision"]}}


def make_dataset(out: Path, n: int = 24, n_val: int = 0, rows: list[dict] | None = None) -> Path:
    system = yaml.safe_load(system_prompts_file().read_text(encoding="utf-8"))["pubmedqa"]
    with Stage("dataset.test", out, {"n": n, "n_val": n_val, "custom": rows is not None}) as st:
        if not st.skipped:
            write_jsonl(st.path("train.jsonl"), rows if rows is not None else
                        [chatml_row(d, system) for d in pubmedqa_rows(n)])
            if n_val:
                write_jsonl(st.path("validation.jsonl"), [chatml_row(d, system) for d in pubmedqa_rows(n_val, n)])
    return out


def make_adapter(base: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter on ``base`` whose B matrices are random (non-zero), so merging changes weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def fake_bench(path, name, correct: list[bool], gold: list[str], first_id: int = 0, task: str = "pubmedqa"):
    """A bench artifact as `tools bench` writes it (results.json + items.jsonl), without a model; items are
    ``q{first_id}``, ``q{first_id + 1}``, ..."""
    from evals.bench import classification_metrics
    from evals.stats import bootstrap_macro_f1, wilson

    rows = []
    for i, (c, g) in enumerate(zip(correct, gold)):
        wrong = "no" if g == "yes" else "yes"
        rows.append({"id": f"q{first_id + i}", "gold": g, "parsed": g if c else wrong, "strict": True, "correct": c,
                     "finish": "decided", "gen_tokens": 1, "raw": g if c else wrong, "prompt_tokens": 10})
    labels = ["yes", "no", "maybe"]
    m = classification_metrics(labels, gold, [r["parsed"] for r in rows])
    res = {"task": task, "mode": "generate", "split": "test", "n": len(rows), "model": {"name": name},
           **m, "accuracy_ci95": wilson(sum(correct), len(rows)), "valid_rate": 1.0,
           "valid_rate_ci95": wilson(len(rows), len(rows)), "valid_rates": {"strict": 1.0, "lenient": 1.0},
           "macro_f1_ci95": bootstrap_macro_f1(labels, gold, [r["parsed"] for r in rows])}
    with Stage(f"bench.{task}", path / name, {"name": name}) as st:
        st.path("results.json").write_text(json.dumps(res))
        st.path("items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return st.result.path


def procs_on(path: Path) -> list[int]:
    """Processes (other than this one) whose command line names ``path``: Axolotl workers of a stage."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(path).encode() in cmd:
            pids.append(int(p.name))
    return pids


def assert_gone_after_kill(path: Path, wait_s: float = 30) -> None:
    """Nothing naming ``path`` goes on running after a SIGKILL of its process group (DataLoader workers
    notice their parent is gone within ~5 s)."""
    import time

    deadline = time.time() + wait_s
    while procs_on(path) and time.time() < deadline:
        time.sleep(0.5)
    assert not procs_on(path), "processes of the killed run are still running"


def cut_off_checkpoint(stage: Path, drop: str, world: int = 1) -> tuple[int, str]:
    """Make a checkpoint one step past the newest whole one that was cut off mid-write (``drop``:
    the file it lacks or, for a .safetensors file, the file truncated to half). Returns (whole step, name)."""
    import shutil

    from recipes.train import checkpoint_problem
    ckpts = sorted((stage / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    whole = [c for c in ckpts if checkpoint_problem(c, world) is None]
    assert whole, [(c.name, checkpoint_problem(c, world)) for c in ckpts]
    k = int(whole[-1].name.split("-")[1])
    for c in ckpts:  # a real cut-off checkpoint past k may exist already: keep one fake one only
        if int(c.name.split("-")[1]) > k:
            shutil.rmtree(c)
    bad = stage / "checkpoints" / f"checkpoint-{k + 1}"
    shutil.copytree(whole[-1], bad)
    state = json.loads((bad / "trainer_state.json").read_text())
    state["global_step"] = k + 1
    (bad / "trainer_state.json").write_text(json.dumps(state))
    f = bad / drop
    if drop.endswith(".safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.unlink()
    assert checkpoint_problem(bad, world) is not None
    return k, bad.name


def shared_tiny_f16(tmp_path_factory, tiny_llama):
    """The ``tiny_llama`` fixture as an f16 GGUF artifact (stage ``gguf``, no fidelity gate), converted once per
    run under a file lock and shared by every module and xdist worker: read it, never write into its folder."""
    from release.convert import Gate, convert_stage
    from tests.conftest import once_per_run

    def build(d):
        convert_stage(tiny_llama, d / "gguf", "f16", gate=Gate(tokens=0))

    folder = once_per_run(tmp_path_factory, "tiny-llama-f16-gguf", build)
    return convert_stage(tiny_llama, folder / "gguf", "f16", gate=Gate(tokens=0))  # up to date: the artifact


def shared_smollm2_f16(tmp_path_factory, smollm2_hf):
    """SmolLM2 (``smollm2_hf``) as an f16 GGUF artifact through `tools convert`'s stage, fidelity gate on,
    converted once per run and shared (test_release's quantization, the two lm-eval agreement checks)."""
    from release.convert import convert_stage
    from tests.conftest import once_per_run

    folder = once_per_run(tmp_path_factory, "smollm2-f16-gguf", lambda d: convert_stage(smollm2_hf, d / "gguf", "f16"))
    return convert_stage(smollm2_hf, folder / "gguf", "f16")  # up to date: the artifact
