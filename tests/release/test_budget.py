"""`tools quantize --budget`: the smallest candidate within budget, every candidate in the table, exit 2 with
nothing written when none is, and the chosen file's KL recomputed here with plain numpy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# Q4_0, Q8_0 and the mixes around Q8_0 (6 candidates), one window of 512 tokens: seconds
TYPES = ["--types", "Q4_0,Q8_0", "--mix-bases", "Q8_0", "--min-tokens", "511"]


@pytest.fixture(scope="module")
def f16(tiny_llama, tmp_path_factory):
    """The tiny Llama's f16 GGUF, converted once per run for every module that asks (tests.helpers)."""
    from tests.helpers import shared_tiny_f16

    a = shared_tiny_f16(tmp_path_factory, tiny_llama)
    return a.path / a.extra["file"]


@pytest.fixture(scope="module")
def everything_run(f16, tmp_path_factory):
    """Q4_0, Q8_0 and every mix around Q8_0 measured (a loose budget, --measure-all): the artifact and its table."""
    from tests.helpers import run_tools

    out = tmp_path_factory.mktemp("all") / "all"
    p = run_tools("quantize", f16, "--budget", "kl=10", "--measure-all", *TYPES, "--out", out, "--json", check=True)
    return out, json.loads(p.stdout)["results"]["candidates"]


@pytest.fixture(scope="module")
def everything(everything_run):
    return everything_run[1]


def one_line_error(p) -> str:
    """Exit 2, no traceback, the reason in one last line (progress of the search may come before it)."""
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and lines[-1].startswith("error: "), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and sum(ln.startswith("error: ") for ln in lines) == 1
    return lines[-1]


def test_a_budget_only_q8_0_meets_picks_q8_0(everything, f16, tools_cli, tmp_path):
    rows = {r["recipe"]: r for r in everything}
    assert "Q8_0" in rows and "Q4_0" in rows and len(rows) >= 4  # stock types and their mixes
    assert all(r["mean_kl"] is not None for r in everything)
    others = [r["mean_kl"] for k, r in rows.items() if k != "Q8_0"]
    assert rows["Q8_0"]["mean_kl"] < min(others)
    budget = (rows["Q8_0"]["mean_kl"] + min(others)) / 2
    p = tools_cli("quantize", f16, "--budget", f"kl={budget:.9f}", *TYPES, "--out", tmp_path / "q8", "--json", check=True)
    res = json.loads(p.stdout)
    assert res["results"]["chosen"] == "Q8_0"
    assert res["manifest"]["extra"]["chosen"]["recipe"] == "Q8_0" and res["manifest"]["extra"]["file_type"] == "Q8_0"
    by = {r["recipe"]: r for r in res["results"]["candidates"]}
    # smallest first: every smaller candidate was measured and missed the budget, Q8_0 is the largest
    assert all(r["status"] == "over the KL budget" for k, r in by.items() if k != "Q8_0")
    assert (tmp_path / "q8" / "pareto.png").stat().st_size > 5000
    md = (tmp_path / "q8" / "candidates.md").read_text()
    assert all(k in md for k in by) and "**Q8_0**" in md
    # a looser budget picks a smaller file, and larger candidates are skipped, not measured
    loose = sorted(everything, key=lambda r: r["size_bytes"])[1]["mean_kl"] * 1.0001
    p = tools_cli("quantize", f16, "--budget", f"kl={loose:.9f}", *TYPES, "--out", tmp_path / "loose", "--json",
                  check=True)
    r = json.loads(p.stdout)["results"]
    chosen = next(c for c in r["candidates"] if c["recipe"] == r["chosen"])
    assert chosen["size_bytes"] < by["Q8_0"]["size_bytes"] and chosen["mean_kl"] <= loose
    assert any(c["status"].startswith("skipped: larger than") for c in r["candidates"])


@pytest.mark.native
def test_chosen_files_kl_recomputed_with_numpy_equals_the_table(everything_run, f16):
    """Plain llama-cpp-python logits and numpy, on the windows the search says it scored (512 tokens each);
    the file the search chose (within kl=10) and its row in the table the search wrote."""
    import llama_cpp

    from release.ggufinfo import read_gguf
    from tools.ggufpath import resolve_gguf

    add_bos = bool(read_gguf(f16, tensors=False)["metadata"].get("tokenizer.ggml.add_bos_token", True))
    art, _ = everything_run
    table = json.loads((art / "candidates.json").read_text())
    row = next(r for r in table["candidates"] if r["recipe"] == table["chosen"])
    text = (art / "heldout.txt").read_text(encoding="utf-8").encode("utf-8")
    logits = []
    for path in (f16, resolve_gguf(art)):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True,
                              n_threads=1, verbose=False)
        toks = llm.tokenize(text, add_bos=add_bos, special=False)[:512]
        per = []
        for i in range(0, len(toks), 512):
            llm.reset()
            llm.eval(toks[i:i + 512])
            per.append(np.array(llm.scores[: len(toks[i:i + 512])], dtype=np.float64)[:-1])
        logits.append(np.concatenate(per))
        llm.close()
    p_log = logits[0] - np.logaddexp.reduce(logits[0], axis=1, keepdims=True)
    q_log = logits[1] - np.logaddexp.reduce(logits[1], axis=1, keepdims=True)
    kl = np.maximum((np.exp(p_log) * (p_log - q_log)).sum(axis=1), 0)
    assert len(kl) == row["tokens_scored"] == 511
    assert row["mean_kl"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-7)
    assert row["mean_kl_ci95"][0] <= row["mean_kl"] <= row["mean_kl_ci95"][1]
    top1 = float((p_log.argmax(1) == q_log.argmax(1)).mean())
    assert row["top1_agreement"] == pytest.approx(top1, abs=1e-6)


def test_impossible_budget_exits_2_names_the_best_and_writes_nothing(everything, f16, tools_cli, tmp_path):
    best = min(everything, key=lambda r: r["mean_kl"])
    assert best["recipe"] == "Q8_0"
    p = tools_cli("quantize", f16, "--budget", f"kl={best['mean_kl'] / 10:.12f}", "--types", "Q8_0", "--min-tokens",
                  "511", "--out", tmp_path / "none")
    line = one_line_error(p)
    assert "no candidate within the budget" in line and f"best found {best['recipe']}" in line
    assert not (tmp_path / "none").exists() and list(tmp_path.iterdir()) == []
    line = one_line_error(tools_cli("quantize", f16, "--budget", "ppl=3", "--out", tmp_path / "bad"))
    assert "--budget" in line and not (tmp_path / "bad").exists()


def test_size_and_memory_limits_pick_the_best_that_fits(everything, f16, tools_cli, tmp_path):
    from release.card import build_card

    sizes = sorted(r["size_bytes"] for r in everything)
    limit = sizes[len(sizes) // 2]
    p = tools_cli("quantize", f16, "--max-size", str(limit), "--max-ram", "1G", "--ctx", "2048", *TYPES,
                  "--out", tmp_path / "s", "--json", check=True)
    r = json.loads(p.stdout)["results"]
    fitting = [c for c in r["candidates"] if c["size_bytes"] <= limit]
    chosen = next(c for c in r["candidates"] if c["recipe"] == r["chosen"])
    assert chosen["mean_kl"] == min(c["mean_kl"] for c in fitting) and chosen["size_bytes"] <= limit
    assert all(c["status"].startswith("over --max-size") for c in r["candidates"] if c["size_bytes"] > limit)
    card = build_card([tmp_path / "s"], tmp_path / "card").path / "README.md"
    text = card.read_text()
    assert f"recipe `{r['chosen']}`" in text and "Laptop fit: runs in" in text and "at 2,048 tokens" in text


@pytest.mark.slow
def test_bench_quant_budget_tiny(f16, tmp_path):
    """bench/bench_quant_budget.py --tiny: the report's dominance and search accounting agree with its table and
    with a real search."""
    from tests.helpers import run_bench

    p = run_bench("bench_quant_budget.py", "--tiny", "--f16", f16, "--out", tmp_path / "b")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    r = json.loads((tmp_path / "b" / "bench_quant_budget.json").read_text())
    rows = json.loads((tmp_path / "b" / "all" / "candidates.json").read_text())["candidates"]
    assert r["candidates"] == len(rows) >= 6 and r["stock"] == 3 and r["tokens_scored"] == 511
    for d in r["dominated_stock_types"]:
        s = next(x for x in rows if x["recipe"] == d["stock"])
        m = next(x for x in rows if x["recipe"] == d["by"])
        assert not m["stock"] and m["size_bytes"] <= s["size_bytes"] and m["mean_kl"] <= s["mean_kl"]
        assert (m["size_bytes"], m["mean_kl"]) != (s["size_bytes"], s["mean_kl"])
        assert d["size_ratio"] == pytest.approx(m["size_bytes"] / s["size_bytes"], abs=1e-4)
    undominated = {x["recipe"] for x in rows if x["stock"]} - {d["stock"] for d in r["dominated_stock_types"]}
    for name in undominated:  # nothing strictly better exists for these
        s = next(x for x in rows if x["recipe"] == name)
        assert not any((m["size_bytes"] <= s["size_bytes"] and m["mean_kl"] < s["mean_kl"])
                       or (m["size_bytes"] < s["size_bytes"] and m["mean_kl"] <= s["mean_kl"]) for m in rows if not m["stock"])
    assert r["front_dominates_two_or_more"] == (len(r["dominated_stock_types"]) >= 2)
    assert r["real_search_pick"] == r["search_pick"] and r["real_search_measured"] == r["search_measured"]
    assert r["search_seconds"] <= r["every_candidate_seconds"]
    assert "stock type | dominated by" in (tmp_path / "b" / "bench_quant_budget.md").read_text()


# ---- acc-drop: accuracy points lost against the f16 on dev items, paired, judged by its interval's upper end ----

ACC = ["--types", "Q4_0,Q8_0", "--mix-bases", "Q8_0", "--min-tokens", "511", "--threads", "1"]


@pytest.fixture(scope="module")
def sharp_f16(tiny_llama, tmp_path_factory):
    """A tiny Llama whose answers depend on the item: every weight matrix of the random model (a copy of the
    session's ``tiny_llama``) x8 (at the usual init a random Llama gives every item the same answer, so
    quantizing it changes none)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from release.convert import Gate, convert_stage

    d = tmp_path_factory.mktemp("sharp")
    m = Path(shutil.copytree(tiny_llama, d / "model"))
    sd = load_file(m / "model.safetensors")
    save_file({k: v * 8 if v.dim() == 2 else v for k, v in sd.items()}, m / "model.safetensors", metadata={"format": "pt"})
    a = convert_stage(m, d / "f16", "f16", gate=Gate(tokens=0))
    return a.path / a.extra["file"]


@pytest.fixture(scope="module")
def dev_items(tmp_path_factory):
    """60 PubMedQA dev items without their abstracts (short prompts: a tiny model scores them in a second)."""
    from tests.helpers import pubmedqa_rows
    from tools.io import write_jsonl

    path = tmp_path_factory.mktemp("items") / "dev-items.jsonl"
    write_jsonl(path, [{"id": d["id"], "question": d["QUESTION"], "options": ["yes", "no", "maybe"],
                        "answer": d["final_decision"]} for d in pubmedqa_rows(60)])
    return path


@pytest.fixture(scope="module")
def acc_all(sharp_f16, dev_items, tmp_path_factory):
    """Q4_0, Q8_0 and the mixes around Q8_0, each with its KL and its paired accuracy drop (--measure-all)."""
    from tests.helpers import run_tools

    out = tmp_path_factory.mktemp("acc") / "all"
    p = run_tools("quantize", sharp_f16, "--budget", "acc-drop=100", "--budget-data", dev_items, "--measure-all", *ACC,
                  "--out", out, "--json", check=True)
    return json.loads(p.stdout)["results"]["candidates"]


def _hi(row: dict) -> float:
    return row["accuracy"]["acc_drop_ci95_points"][1]


def _first_within(rows: list[dict], kl: float, drop: float) -> dict | None:
    """The search's pick computed from an exhaustive table: smallest first (stock before mix on a tie)."""
    order = sorted(rows, key=lambda r: (r["size_bytes"], not r["stock"], r["recipe"]))
    return next((r for r in order if r["mean_kl"] <= kl and _hi(r) <= drop), None)


def test_acc_drop_budget_only_near_lossless_candidates_meet(acc_all, sharp_f16, dev_items, tools_cli, tmp_path):
    rows = {r["recipe"]: r for r in acc_all}
    assert len(rows) >= 4 and all(r["accuracy"] and r["accuracy"]["items"] == 60 for r in acc_all)
    q4, q8 = rows["Q4_0"]["accuracy"], rows["Q8_0"]["accuracy"]
    assert q4["lost"] + q4["gained"] > 0 and q4["ref_accuracy"] == q8["ref_accuracy"]  # 4 bits change answers
    budget = _hi(rows["Q8_0"])
    assert _hi(rows["Q4_0"]) > budget  # only the 8-bit candidates are sure to lose no more than Q8_0 does
    want = _first_within(acc_all, float("inf"), budget)
    assert want["recipe"].startswith("Q8_0") and want["size_bytes"] > rows["Q4_0"]["size_bytes"]
    p = tools_cli("quantize", sharp_f16, "--budget", f"acc-drop={budget}", "--budget-data", dev_items, *ACC,
                  "--out", tmp_path / "acc", "--json", check=True)
    r = json.loads(p.stdout)["results"]
    assert r["chosen"] == want["recipe"] and r["budget"]["max_acc_drop"] == budget
    by = {c["recipe"]: c for c in r["candidates"]}
    assert by[want["recipe"]]["accuracy"] == want["accuracy"]  # same items, same file: the same answers
    for c in r["candidates"]:
        if c["size_bytes"] < want["size_bytes"]:  # every smaller one measured and over the drop budget
            assert c["status"].startswith("over the acc-drop budget") and _hi(c) > budget
        elif c["recipe"] != want["recipe"]:
            assert c["status"].startswith("skipped") and c["accuracy"] is None
    md = (tmp_path / "acc" / "candidates.md").read_text()
    assert "drop vs f16, points [95 % CI]" in md and f"**{want['recipe']}**" in md
    # combined with a KL budget no larger than Q8_0's KL: the smallest candidate within both
    kl = rows["Q8_0"]["mean_kl"]
    both = _first_within(acc_all, kl, budget)
    p = tools_cli("quantize", sharp_f16, "--budget", f"acc-drop={budget}", "--budget", f"kl={kl}", "--budget-data",
                  dev_items, *ACC, "--out", tmp_path / "both", "--json", check=True)
    assert json.loads(p.stdout)["results"]["chosen"] == both["recipe"]


def test_impossible_acc_drop_exits_2_and_writes_nothing(acc_all, sharp_f16, dev_items, tools_cli, tmp_path):
    from tools.paths import bundled_data

    q4 = next(r for r in acc_all if r["recipe"] == "Q4_0")
    assert _hi(q4) > 0
    only_q4 = ["--types", "Q4_0", "--mix-bases", "Q8_0", "--min-tokens", "511", "--threads", "1"]  # no mixes
    p = tools_cli("quantize", sharp_f16, "--budget", f"acc-drop={_hi(q4) / 2}", "--budget-data", dev_items, *only_q4,
                  "--out", tmp_path / "none")
    line = one_line_error(p)
    assert "no candidate within the budget" in line and "best found Q4_0" in line and "accuracy drop" in line
    assert f"{_hi(q4):g}]" in line and not (tmp_path / "none").exists()
    test_row = json.loads((bundled_data() / "pubmedqa" / "test.jsonl").read_text().splitlines()[0])
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(dev_items.read_text() + json.dumps({"id": test_row["id"], "question": test_row["QUESTION"],
                     "options": ["yes", "no", "maybe"], "answer": test_row["final_decision"]}) + "\n")
    for data, why in ((leaky, "benchmark test item"), ("pubmedqa-test", "never on test"), ("nope.jsonl", "neither")):
        line = one_line_error(tools_cli("quantize", sharp_f16, "--budget", "acc-drop=5", "--budget-data", data,
                                        *only_q4, "--out", tmp_path / "bad"))
        assert why in line and "--budget-data" in line and not (tmp_path / "bad").exists()
    for args in (["--budget", "acc-drop=-1"], ["--budget", "kl=1", "--budget-data", dev_items]):
        line = one_line_error(tools_cli("quantize", sharp_f16, *args, *only_q4, "--out", tmp_path / "bad"))
        assert "--budget" in line and not (tmp_path / "bad").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["leaky.jsonl"]


def test_paired_acc_drop_recomputed_independently_equals_the_table(sharp_f16, dev_items, tools_cli, tmp_path):
    """Both files benched by `tools bench mcq --mode loglik`, the pairing and the Wald interval done here."""
    from tools.ggufpath import resolve_gguf

    only_q4 = ["--types", "Q4_0", "--mix-bases", "Q8_0", "--min-tokens", "511", "--threads", "1"]
    tools_cli("quantize", sharp_f16, "--budget", "acc-drop=100", "--budget-data", dev_items, *only_q4,
              "--out", tmp_path / "q4", check=True)
    table = json.loads((tmp_path / "q4" / "candidates.json").read_text())
    row = next(r for r in table["candidates"] if r["recipe"] == table["chosen"])["accuracy"]
    right = []
    for name, model in (("f16", sharp_f16), ("q", resolve_gguf(tmp_path / "q4"))):
        tools_cli("bench", "mcq", "--data", dev_items, "--mode", "loglik", "--model", model, "--threads", "1",
                  "--out", tmp_path / name, check=True)
        items = [json.loads(x) for x in (tmp_path / name / "items.jsonl").read_text().splitlines()]
        right.append({it["id"]: it["correct"] for it in items})
    f, q = right
    assert set(f) == set(q) and len(f) == row["items"] == 60
    lost = sum(f[i] and not q[i] for i in f)
    gained = sum(q[i] and not f[i] for i in f)
    n = len(f)
    d = (lost - gained) / n
    half = 1.959963984540054 * np.sqrt(max(0.0, (lost + gained) / n - d * d) / n)
    assert lost + gained > 0 and (row["lost"], row["gained"]) == (lost, gained)
    assert row["accuracy"] == pytest.approx(sum(q.values()) / n, abs=1e-6)
    assert row["ref_accuracy"] == pytest.approx(sum(f.values()) / n, abs=1e-6)
    assert row["acc_drop_points"] == pytest.approx(100 * d, abs=1e-3)
    assert row["acc_drop_ci95_points"] == pytest.approx([100 * (d - half), 100 * (d + half)], abs=1e-3)
