"""One GGUF resolver for every GGUF verb: a `quantize --split-max-size` result (llama.cpp's gguf-split
shards) goes through inspect, bench, chat --once, export and imatrix, and the thread rule is the documented one."""
from __future__ import annotations

import json

import pytest

from tests.helpers import make_corpus, run_tools, shared_tiny_f16
from tools.errors import UserError
from tools.ggufpath import default_threads, gguf_shards, physical_cores, resolve_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    """The tiny Llama's f16 GGUF (converted once per run for every module that asks, tests.helpers): the
    resolver's rules do not depend on the model, and its small vocabulary reads in milliseconds."""
    a = shared_tiny_f16(tmp_path_factory, tiny_llama)
    return a.path / a.extra["file"]


@pytest.fixture(scope="module")
def split_q(tmp_path_factory, tiny_gguf):
    """The tiny Llama quantized to Q4_0 and cut into shards of at most 50 kB of tensor data."""
    out = tmp_path_factory.mktemp("split") / "q4_0"
    run_tools("quantize", tiny_gguf, "--q", "Q4_0", "--split-max-size", "50K", "--threads", "2", "--out", out,
              check=True)
    return out


def test_resolver_takes_the_first_shard_and_refuses_an_incomplete_set(split_q, tmp_path):
    shards = sorted(split_q.glob("*.gguf"))
    assert len(shards) >= 3
    assert resolve_gguf(split_q) == shards[0] == resolve_gguf(shards[-1])  # any shard -> the one llama.cpp loads
    assert gguf_shards(shards[0]) == shards
    part = tmp_path / "part"
    part.mkdir()
    for s in shards[:-1]:
        (part / s.name).hardlink_to(s)
    with pytest.raises(UserError, match="expected a .gguf file or a folder holding exactly one"):
        resolve_gguf(part)
    with pytest.raises(UserError, match="incomplete gguf-split set"):
        resolve_gguf(part / shards[0].name)


def test_split_gguf_through_every_gguf_verb(split_q, tiny_gguf, tmp_path):
    shards = sorted(split_q.glob("*.gguf"))
    assert len(shards) >= 3
    whole = json.loads(run_tools("inspect", tiny_gguf, "--json", check=True).stdout)["results"]
    info = json.loads(run_tools("inspect", split_q, "--json", check=True).stdout)["results"]
    # the whole model, not its first shard: every tensor, every byte
    assert info["tensor_count"] == whole["tensor_count"] and info["parameters"] == whole["parameters"]
    assert info["size_bytes"] == sum(s.stat().st_size for s in shards)

    p = run_tools("bench", "pubmedqa", "--model", split_q, "--mode", "loglik", "--limit", "2", "--threads", "1",
                  "--out", tmp_path / "bench", "--json", check=True)
    res = json.loads(p.stdout)["results"]
    assert res["n"] == 2 and res["model"]["name"] == shards[0].name

    p = run_tools("chat", split_q, "--once", "Name one symptom of influenza.", "--max-tokens", "8",
                  "--temperature", "0", "--n-ctx", "512", "--threads", "1", check=True)
    assert p.stdout.strip()

    p = run_tools("export", "ollama", split_q, "--out", tmp_path / "ollama", "--json", check=True)
    exported = sorted(f.name for f in (tmp_path / "ollama").glob("*.gguf"))
    assert exported == [s.name for s in shards]  # every shard beside the first, which the Modelfile names
    assert f"FROM ./{shards[0].name}" in (tmp_path / "ollama" / "Modelfile").read_text()

    corpus = make_corpus(tmp_path / "corpus", n=4)
    p = run_tools("imatrix", split_q, "--corpus", corpus, "--chunks", "1", "--ctx", "64", "--threads", "1",
                  "--out", tmp_path / "imx", "--json", check=True)
    assert json.loads(p.stdout)["manifest"]["extra"]["entries"] == 2 * 7  # every blk weight of all shards


def test_default_threads_is_omp_num_threads_else_physical_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3 and default_threads(5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == physical_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert default_threads() == physical_cores()
