"""Fixtures shared by all tests: the tiny Llama, the embedded SmolLM2 GGUF and its HF form.

No test touches the network: the Hub is switched off for the whole session.
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

from tests.helpers import REPO, run_tools  # noqa: E402 - after the environment above


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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random-weight Llama + a BPE tokenizer trained in this session (ChatML template)."""
    from tools.tinymodel import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tools.paths import embedded_gguf
    return embedded_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct in HF form, dequantized from the packaged GGUF (no Hub)."""
    from tools.hfmodels import gguf_to_hf
    art = gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")
    return art.path


@pytest.fixture
def tools_cli():
    return run_tools
