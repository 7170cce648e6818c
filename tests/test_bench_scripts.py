"""Every bench/ script runs end to end on a tiny size, so a change of shape (the --json payload, a results key,
a function's arguments) cannot break `make bench` unseen. Each run is checked on the figures it writes, not
on its speed (the machine is shared): a crash anywhere leaves no figures file and a traceback."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_bench

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))


def run_script(name: str, *args, ok_codes=(0,)) -> subprocess.CompletedProcess:
    """`python bench/NAME ARGS` from the repository root, as `make bench` runs it (in a forked child of the worker:
    tests.helpers.run_forked)."""
    p = run_bench(name, *args)
    assert p.returncode in ok_codes and "Traceback" not in p.stderr, (p.returncode, p.stdout[-2000:], p.stderr[-4000:])
    return p


def test_every_bench_script_has_a_tiny_run_here():
    tested = {"bench_corpus.py", "bench_eval.py", "bench_imatrix.py", "bench_llama.py", "bench_samples.py",
              "shape_figures.py",
              "bench_suite_validity.py",  # its tiny run: tests/evals/test_suite_validity.py (needs the smollm2_hf fixture)
              "bench_quant_budget.py"}  # its tiny run: tests/release/test_budget.py
    assert set(SCRIPTS) == tested, f"a bench/ script without a tiny run: {set(SCRIPTS) - tested}"


def test_bench_corpus_tiny(tmp_path):
    run_script("bench_corpus.py", "--size-mb", "0.3", "--workers", "1", "--out", tmp_path)
    res = json.loads((tmp_path / "corpus_bench.json").read_text())["results"][0]
    assert res["notes_read"] >= res["notes_kept"] > 10 and res["input_bytes"] >= 300_000
    assert res["wall_s"] > 0 and res["peak_rss_mb"] > 0
    assert (tmp_path / "corpus_bench.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def imatrix_run(tmp_path_factory, tiny_llama) -> Path:
    """bench_imatrix.py on the tiny Llama, once: its figures are checked below, and the f16 GGUF it converts
    (reference-f16.gguf) is the model bench_eval.py and bench_samples.py run on (a tiny model: their tiny runs
    check the shape of what they write, not SmolLM2's figures)."""
    out = tmp_path_factory.mktemp("imatrix")
    run_script("bench_imatrix.py", "--hf", tiny_llama, "--chunks", "1", "--ctx", "32", "--heldout-items", "2",
               "--max-tokens", "64", "--threads", "1", "--out", out)
    return out


def test_bench_imatrix_tiny(imatrix_run):
    rep = json.loads((imatrix_run / "bench_imatrix.json").read_text())
    assert len(rep["rows"]) == 4 and all(r["mean_kl"] >= 0 and r["tokens"] > 0 for r in rep["rows"])
    assert (imatrix_run / "bench_imatrix.md").is_file()


def test_bench_eval_and_samples_tiny(tmp_path, imatrix_run):
    model = imatrix_run / "reference-f16.gguf"  # the tiny Llama as an f16 GGUF
    # MISS (exit 1) is a measured outcome on a shared machine; a crash has a traceback and no figures
    run_script("bench_eval.py", "--model", model, "--limit", "2", "--gen-limit", "1", "--server-items", "0",
               "--samples-items", "0", "--quick", "--threads", "1", "--out", tmp_path, ok_codes=(0, 1))
    rep = json.loads((tmp_path / "bench_eval.json").read_text())
    assert rep["loglik"]["n"] == 2 and rep["generate"]["n"] == 1 and rep["loglik"]["ratio_to_floor"] > 0
    run_script("bench_samples.py", "--model", model, "--items", "1", "--samples", "2", "--max-tokens", "4",
               "--threads", "1", "--out", tmp_path / "s", ok_codes=(0, 1))
    sm = json.loads((tmp_path / "s" / "bench_samples.json").read_text())
    assert sm["samples"] == 2 and sm["independent"]["generated_tokens"] > 0
    assert sm["bench_cot_samples"]["s_per_item"] > 0  # the real `tools bench --cot --samples` on the same items


def test_bench_llama_tiny(tmp_path):
    run_script("bench_llama.py", "--quick", "--threads", "1", "--out", tmp_path)
    rep = json.loads((tmp_path / "bench_llama.json").read_text())
    assert set(rep["models"]) == {"Q4_1", "Q3_K_L"}
    assert all(r["pp_tok_s"] > 0 for m in rep["models"].values() for r in m["measured"].values())


def test_shape_figures_counts_what_it_says(tmp_path):
    """On a small tree made here: one 81-line function, one of 9 parameters, one import inside a function, one
    import circle (hidden inside a function) -> exactly those figures."""
    pkg = tmp_path / "tools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    (pkg / "a.py").write_text(f"def long():\n{body}\n    return 0\n\n\ndef wide(a, b, c, d, e, f, g, h, i):\n"
                              "    from tools import b\n    return b\n")
    (pkg / "b.py").write_text("from tools import a\n")
    p = run_script("shape_figures.py", tmp_path, "--json")
    f = json.loads(p.stdout)
    assert f["longest_function"]["lines"] == 81 and len(f["functions_over_80_lines"]) == 1
    assert f["functions_over_8_params"] == ["tools/a.py:84 wide (9 params)"]
    assert f["imports_inside_functions_outside_cli"] == 1
    assert f["import_circles"] == [["tools.a", "tools.b"]]
