"""Fixtures shared by all tests: the tiny Llama, the embedded SmolLM2 GGUF and its HF form.

No test touches the network: the Hub is switched off for the whole session.

`make test` runs the suite on two pytest-xdist workers (``-n 2 --dist loadscope``: a module's tests
stay on one worker, so module fixtures such as a reference training are made once). The models
every worker needs are built once per run, by whichever worker asks first, under a file lock in
the run's base temp folder (pytest-xdist's documented pattern), and the modules marked ``slow``
are handed out first, so that no long module starts last on an otherwise idle machine.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# tests/ is a package (tests.corpora, tests.evals, ...): pytest puts the repository root on sys.path, so
# `tools`, `evals`, ... are the packages of this tree and never a test folder of the same name.
pytest_plugins = ["tests.isolation", "pytester"]

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1"}.items():
    os.environ[_k] = _v

# The workers pytest-xdist starts get hash seed 0, the one `tools train` gives Axolotl (peft's set order), so that
# a one-process `axolotl train` can run as a fork of the worker (tests/warm_axolotl.py).
os.environ.setdefault("PYTHONHASHSEED", "0")

# Under pytest-xdist (`make test`: two workers on two cores) every worker and every program a test starts gets one
# thread (torch in Axolotl and `tools`, llama.cpp's default): the other worker holds the other core, and a second
# thread waiting for a busy core made tiny forwards and benches 2-36x slower (the `one_thread` fixture's figures).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from tests import warm_axolotl  # noqa: E402 - after the environment above
from tests.helpers import REPO, run_tools  # noqa: E402

warm_axolotl.install()   # a one-process Axolotl command or converter a test starts is a fork of the worker


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_notes_csv() -> Path:
    """207 synthetic clinical notes in NOTEEVENTS.csv layout, shipped with the product (license beside them)."""
    from tools.paths import demo_notes_csv as f
    return f()


@pytest.fixture(scope="session")
def pg_server():
    """One throw-away PostgreSQL cluster for the session (each test module makes its own databases)."""
    from tools.pgserver import PgServer, find_bindir

    if find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (make system-deps installs Debian's postgresql)")
    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()


# The longest modules, longest first (seconds of one worker in a quiet `make test`, session 9): handed out before
# the other slow modules, so that the run does not end on one of them while the other worker idles (the Makefile's
# --no-loadscope-reorder keeps this order: xdist would otherwise sort modules by their number of tests).
LONGEST_MODULES = ("tests.recipes.test_train_distributed",   # ~175 s
                   "tests.tools.test_demo",                  # ~130 s
                   "tests.release.test_release",             # ~100 s
                   "tests.evals.test_audit")                 # ~45 s


def pytest_collection_modifyitems(config, items):
    """Modules with a test marked ``slow`` first, LONGEST_MODULES before them (stable: file order otherwise; a
    module stays contiguous)."""
    slow = {it.module.__name__ for it in items if it.get_closest_marker("slow") and getattr(it, "module", None)}

    def rank(it) -> tuple[int, int]:
        name = getattr(getattr(it, "module", None), "__name__", None)
        if name in LONGEST_MODULES:
            return 0, LONGEST_MODULES.index(name)
        return (1 if name in slow else 2), 0
    items.sort(key=rank)


def once_per_run(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once for the whole run, shared by every xdist worker (file lock, then a done-marker)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base temp of the run: each worker has its own folder below it
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(folder)
            done.write_text(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random-weight Llama + a BPE tokenizer trained in this session (ChatML template)."""
    from tools.tinymodel import build_tiny_llama
    return once_per_run(tmp_path_factory, "tiny-llama", lambda d: build_tiny_llama(d / "model")) / "model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tools.paths import embedded_gguf
    return embedded_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct in HF form, dequantized from the packaged GGUF (no Hub)."""
    from tools.hfmodels import gguf_to_hf
    return once_per_run(tmp_path_factory, "smollm2", lambda d: gguf_to_hf(smollm2_gguf, d / "hf")) / "hf"


@pytest.fixture(scope="session")
def smollm2_f16(tmp_path_factory, smollm2_hf):
    """SmolLM2 as an f16 GGUF artifact, converted once per run (tests.helpers.shared_smollm2_f16)."""
    from tests.helpers import shared_smollm2_f16
    return shared_smollm2_f16(tmp_path_factory, smollm2_hf)


@pytest.fixture
def tools_cli():
    return run_tools


@pytest.fixture
def one_thread(monkeypatch):
    """One thread for torch here and for the programs the test starts (``OMP_NUM_THREADS=1``: torch in
    Axolotl and `tools eval`, llama.cpp's default thread count). The tiny models gain nothing from a
    second thread, and under `make test` the other worker holds the other core: threads waiting for a
    busy core made a tiny Llama forward over 800 tokens 0.55 s instead of 0.015 s in this process, a
    20-item bench of the tiny GGUF 34 s instead of 4 s, and a 12-step tiny LoRA run's steps 21 s
    instead of 11 s (2 cores, load average 2-5)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
