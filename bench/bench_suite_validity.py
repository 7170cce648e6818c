"""`make bench-suite`: `tools eval suite open-medical` agrees with lm-eval's own run, and its speed.

1. Validity. An HF checkpoint (default: SmolLM2-135M-Instruct made by `tools base-model`, no Hub)
   is converted to an f16 GGUF with llama.cpp's converter. On the first ``--items`` questions of
   every task (default 200; all where a task has fewer) the suite scores the GGUF, and lm-eval's
   ``simple_evaluate`` scores the HF checkpoint through its ``hf`` backend on the same task objects
   (lm-eval's task files over the same local docs). Per task: the share of questions where both
   predict the same choice (target >= 98 %) and the two accuracies (target within 1 point).
   MedMCQA takes part when ``--medmcqa FILE`` is given (it is not shipped).
2. Speed. Against the floor: the suite on the embedded Q4_1 (``--speed-items`` per task) against
   llama.cpp's floor on the tokens it evaluates: evaluated tokens / llama.cpp's prompt-processing
   speed measured in this run on the same file and threads (bench/bench_eval.py). Target <= 1.2x.
   Against lm-eval's own GGUF route: lm-eval's ``gguf`` model against ``python -m llama_cpp.server``
   on the same Q4_1, threads and questions (the first ``--route-items`` of every task), seconds per
   question against the suite's on those questions. Target: the suite >= 20x faster per question.
   For reference, part 1's wall times give the speed-up over lm-eval's ``hf`` route too (a float32
   torch model, another file: not the target's comparison).

Writes OUT/suite_validity.{json,md,png}; exit 0 when every target is met, 1 otherwise.
``--tiny`` (1 question per task, no speed parts) is what tests/evals/test_suite_validity.py runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

AGREE_MIN = 0.98
ACC_GAP_MAX = 0.01


def lm_eval_hf(hf: Path, tasks: dict, limit: int, batch_size: int) -> dict:
    """lm-eval's own evaluator on the HF checkpoint (its `hf` backend): {task: {"acc", "pred" [per doc]}}."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=batch_size)
    res = evaluate(lm=lm, task_dict=tasks, limit=limit, log_samples=True, bootstrap_iters=0)
    out = {}
    for name in tasks:
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        preds = []
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            preds.append(max(range(len(lls)), key=lambda i: (lls[i], -i)))
        out[name] = {"acc": float(res["results"][name]["acc,none"]), "pred": preds}
    return out


def compare(ours: dict, theirs: dict) -> dict:
    """Per task: n, agreement, both accuracies, the gap and whether the targets are met."""
    rows = {}
    for name, t in theirs.items():
        mine = ours[name]
        n = len(mine["pred"])
        if n != len(t["pred"]):
            raise SystemExit(f"{name}: {n} questions scored by the suite, {len(t['pred'])} by lm-eval")
        agree = sum(a == b for a, b in zip(mine["pred"], t["pred"])) / n
        gap = abs(mine["acc"] - t["acc"])
        rows[name] = {"n": n, "agreement": round(agree, 4), "acc_suite": round(mine["acc"], 4),
                      "acc_lm_eval_hf": round(t["acc"], 4), "acc_gap": round(gap, 4),
                      "ok": agree >= AGREE_MIN and gap <= ACC_GAP_MAX + 1e-9}
    return rows


def suite_run(model: Path, limit: int, data: dict, out: Path, threads: int | None) -> tuple[dict, dict]:
    """The suite on ``model``: ({task: {"acc", "pred"}}, manifest timing)."""
    from evals.suite import SuiteSpec, run_suite

    art = run_suite(SuiteSpec(model=model, data=data, limit=limit, threads=threads, out=out, force=True, plots=False))
    res = json.loads((art.path / "results.json").read_text())
    ours = {}
    for name, v in res["tasks"].items():
        rows = [json.loads(x) for x in (art.path / name / "items.jsonl").read_text().splitlines()]
        ours[name] = {"acc": v["acc"], "pred": [r["pred"] for r in rows]}
    return ours, {**art.extra["timing"], "n": res["n"], "average": res["average"]}


def speed(limit: int, data: dict, out: Path, threads: int | None) -> dict:
    """The suite on the embedded Q4_1 against llama.cpp's floor on the tokens it evaluates."""
    from bench_eval import floor_speed

    from tools.paths import embedded_gguf

    model = embedded_gguf()
    fl = floor_speed(model, threads)
    _, tim = suite_run(model, limit, data, out / "speed", threads)
    floor_s = tim["evaluated_tokens"] / fl["pp_tok_s"]
    return {"model": model.name, "items": tim["n"], "wall_s": tim["wall_s"], "s_per_item": tim["s_per_item"],
            "evaluated_tokens": tim["evaluated_tokens"], "pp_tok_s": round(fl["pp_tok_s"], 1),
            "floor_s": round(floor_s, 3), "ratio_to_floor": round(tim["wall_s"] / floor_s, 3), "target": 1.2,
            "threads": tim["threads"]}


def gguf_route(route_items: int, build_tasks, data: dict, out: Path, threads: int | None) -> dict:
    """lm-eval's gguf model against llama_cpp.server and the suite, same Q4_1, threads and questions."""
    from bench_eval import llama_cpp_server
    from lm_eval.evaluator import evaluate
    from lm_eval.models.gguf import GGUFLM

    from tools.ggufpath import default_threads
    from tools.paths import embedded_gguf

    model, n_threads = embedded_gguf(), default_threads(threads)
    _, tim = suite_run(model, route_items, data, out / "route-suite", n_threads)
    with llama_cpp_server(model, n_threads, out / "route-lm-eval") as (url, failures):
        t = time.perf_counter()
        res = evaluate(lm=GGUFLM(base_url=url), task_dict=build_tasks(), limit=route_items, log_samples=True,
                       bootstrap_iters=0)
        wall = time.perf_counter() - t
    n = sum(len(v) for v in res["samples"].values())
    requests = sum(len(s["filtered_resps"]) for v in res["samples"].values() for s in v)
    if n != tim["n"]:
        raise SystemExit(f"gguf route: {n} questions scored by lm-eval, {tim['n']} by the suite")
    per_q = {"suite": tim["wall_s"] / n, "lm_eval_gguf": wall / n}
    return {"model": model.name, "threads": n_threads, "questions": n, "requests": requests,
            "wall_s": {"suite": round(tim["wall_s"], 2), "lm_eval_gguf": round(wall, 2)},
            "s_per_question": {k: round(v, 4) for k, v in per_q.items()},
            "speedup": round(per_q["lm_eval_gguf"] / max(per_q["suite"], 1e-9), 1), "target": 20,
            "unusable_requests": failures["n"]}


def render(report: dict, out: Path) -> None:
    from evals.suite import OPEN_MEDICAL
    from tools.plotting import pyplot, save_png

    cols = {t.name: t.column for t in OPEN_MEDICAL}
    lines = [f"# Suite validity: GGUF f16 via the suite vs lm-eval `hf` on {report['hf']}", "",
             "| task | n | agreement | acc suite | acc lm-eval hf | gap | ok |", "|---|---|---|---|---|---|---|"]
    for name, r in report["tasks"].items():
        lines.append(f"| {cols[name]} | {r['n']} | {100 * r['agreement']:.1f}% | {100 * r['acc_suite']:.1f}% | "
                     f"{100 * r['acc_lm_eval_hf']:.1f}% | {100 * r['acc_gap']:.1f} | {'yes' if r['ok'] else 'NO'} |")
    for name, why in report["skipped"].items():
        lines.append(f"| {cols[name]} | - | - | - | - | - | skipped: {why} |")
    w = report["wall_s"]
    lines += ["", f"Wall time on these questions: suite {w['suite']:.1f} s (GGUF f16), lm-eval hf {w['lm_eval_hf']:.1f} s "
              f"-> {report['speedup_vs_lm_eval_hf']:.1f}x per question (another model file and backend: for reference only)"]
    rt = report.get("gguf_route")
    if rt:
        lines += ["", f"lm-eval's GGUF route (its gguf model against llama_cpp.server) on {rt['questions']} questions "
                  f"({rt['requests']} requests) of {rt['model']}, {rt['threads']} threads: "
                  f"{rt['s_per_question']['lm_eval_gguf']:.2f} s a question against the suite's "
                  f"{rt['s_per_question']['suite']:.3f} s -> the suite is {rt['speedup']:.1f}x faster (target >= 20x)"]
    sp = report.get("speed")
    if sp:
        lines += ["", f"Speed: {sp['items']} questions on {sp['model']} in {sp['wall_s']:.1f} s, {sp['evaluated_tokens']}"
                  f" tokens evaluated; llama.cpp floor {sp['floor_s']:.1f} s at {sp['pp_tok_s']} tok/s -> "
                  f"{sp['ratio_to_floor']:.2f}x (target <= 1.2x)"]
    (out / "suite_validity.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    names = list(report["tasks"])
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(names) + 1.5))
    ax.barh(range(len(names)), [100 * report["tasks"][n]["agreement"] for n in names], color="#4477aa")
    ax.axvline(100 * AGREE_MIN, color="#cc6677", linestyle="--", label=f"target {100 * AGREE_MIN:.0f} %")
    ax.set_yticks(range(len(names)), [cols[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("questions where the suite (GGUF) and lm-eval hf pick the same choice, %")
    ax.legend(loc="lower left")
    fig.tight_layout()
    save_png(fig, out / "suite_validity.png")


def main(argv=None) -> int:
    from evals.suite import OPEN_MEDICAL, SuiteSpec, build_task, resolve_data
    from release.convert import convert_hf_to_gguf
    from tools.hfmodels import gguf_to_hf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=None, help="HF checkpoint (default: `tools base-model`'s SmolLM2)")
    ap.add_argument("--items", type=int, default=200, help="questions per task (all where a task has fewer)")
    ap.add_argument("--speed-items", type=int, default=200, help="questions per task for the speed part (0: skip)")
    ap.add_argument("--medmcqa", type=Path, default=None, help="MedMCQA validation file (not shipped)")
    ap.add_argument("--tiny", action="store_true", help="1 question per task, no speed part (the test's mode)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval hf batch size")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-suite-validity")
    ap.add_argument("--route-items", type=int, default=2,
                    help="questions per task through lm-eval's gguf route, llama_cpp.server (0: skip)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.items, a.speed_items, a.route_items = 1, 0, 0
    a.out.mkdir(parents=True, exist_ok=True)
    hf = a.hf or gguf_to_hf(None, a.out / "hf").path
    gguf = a.out / "model-f16.gguf"
    if not gguf.is_file():
        convert_hf_to_gguf(hf, gguf, "f16")
    data = {"medmcqa": str(a.medmcqa)} if a.medmcqa else {}
    files, skipped = resolve_data(SuiteSpec(data=data))
    t0 = time.perf_counter()
    ours, _ = suite_run(gguf, a.items, data, a.out / "suite", a.threads)
    t1 = time.perf_counter()

    def build_tasks():
        return {t.name: build_task(t, t.docs(files[t.name])) for t in OPEN_MEDICAL if t.name in files}
    theirs = lm_eval_hf(hf, build_tasks(), a.items, a.batch_size)
    report = {"hf": str(hf), "gguf": gguf.name, "items_per_task": a.items, "tasks": compare(ours, theirs),
              "skipped": skipped, "wall_s": {"suite": round(t1 - t0, 1), "lm_eval_hf": round(time.perf_counter() - t1, 1)}}
    # the same questions through lm-eval's own route (its hf backend) against the suite: per-question speed-up
    report["speedup_vs_lm_eval_hf"] = round(report["wall_s"]["lm_eval_hf"] / max(report["wall_s"]["suite"], 1e-9), 1)
    if a.speed_items:
        report["speed"] = speed(a.speed_items, data, a.out, a.threads)
    if a.route_items:
        report["gguf_route"] = gguf_route(a.route_items, build_tasks, data, a.out, a.threads)
    (a.out / "suite_validity.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    render(report, a.out)
    print((a.out / "suite_validity.md").read_text())
    ok = all(r["ok"] for r in report["tasks"].values()) and report.get("speed", {}).get("ratio_to_floor", 0) <= 1.2
    ok &= report.get("gguf_route", {}).get("speedup", 99) >= 20
    print(f"{'PASS' if ok else 'MISS'}: figures in {a.out / 'suite_validity.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
