"""`tools report BENCH_DIR...`: bench runs side by side on the same items (base vs fine-tuned)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evals.stats import mcnemar, paired_bootstrap_f1, verdict
from tools.artifact import Artifact, Stage, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl, write_json
from tools.plotting import pyplot, save_png
from tools.stages import BENCH

from .general import paired_delta
from .verdict import verdict_block, verdict_markdown

DEFAULT_TITLE = "MediLoRA: base vs fine-tuned under the MediLoRA protocol"


def _load(d: str) -> tuple[dict, list[dict], dict]:
    art = read_artifact(d, stage=BENCH)
    res = json.loads((art.path / "results.json").read_text())
    rows = list(read_jsonl(art.path / "items.jsonl"))
    return res, rows, art.extra


def compare_rows(runs: list[tuple[str, dict, list[dict], dict]]) -> list[dict]:
    for label, res, rows, _ in runs[1:]:
        if res["task"] != runs[0][1]["task"]:
            raise UserError(f"{label} is a {res['task']} run, {runs[0][0]} a {runs[0][1]['task']} run", field="BENCH_DIR")
        shared = {r["id"] for r in rows} & {r["id"] for r in runs[0][2]}
        if not shared:
            raise UserError(f"{label} and {runs[0][0]} share no items (use the same data)", field="BENCH_DIR")
    table = []
    for label, res, rows, extra in runs:
        table.append({"run": label, "model": res["model"]["name"], "mode": res.get("mode"), "n": res["n"],
                      "accuracy": res["accuracy"], "accuracy_ci95": res.get("accuracy_ci95"),
                      "valid_rate": res.get("valid_rate"), "valid_rate_ci95": res.get("valid_rate_ci95"),
                      "valid_strict": (res.get("valid_rates") or {}).get("strict"),
                      "macro_f1": res.get("macro_f1"), "macro_f1_ci95": res.get("macro_f1_ci95"),
                      "s_per_item": (extra.get("timing") or {}).get("s_per_item")})
    return table


def _pred(row: dict) -> str | None:
    return row["pred"] if "pred" in row else row.get("parsed")


def paired(a: tuple, b: tuple, seed: int = 0) -> dict:
    """B against A on their shared items: exact McNemar on correctness, paired bootstrap on macro-F1."""
    (la, ra, rows_a, _), (lb, _, rows_b, _) = a, b
    by_b = {r["id"]: r for r in rows_b}
    pairs = [(r, by_b[r["id"]]) for r in rows_a if r["id"] in by_b]
    mc = mcnemar([bool(x["correct"]) for x, _ in pairs], [bool(y["correct"]) for _, y in pairs])
    gold = [x["gold"] for x, _ in pairs]
    labels = list((ra.get("confusion") or {}).get("labels") or [])
    for row in [*rows_a, *rows_b]:  # labels predicted or gold in either run, first run's order first
        for lab in (row["gold"], _pred(row)):
            if lab is not None and lab not in labels:
                labels.append(lab)
    pa = [_pred(x) for x, _ in pairs]
    pb = [_pred(y) for _, y in pairs]
    f1 = paired_bootstrap_f1(labels, gold, pa, pb, seed=seed)
    acc_a = sum(bool(x["correct"]) for x, _ in pairs) / len(pairs)
    acc_b = sum(bool(y["correct"]) for _, y in pairs) / len(pairs)
    beats = mc["p"] < 0.05 and mc["a_wrong_b_right"] > mc["a_right_b_wrong"]
    f1_word = ("higher" if f1["ci95"][0] > 0 else "lower" if f1["ci95"][1] < 0 else "not significantly different")
    return {"a": la, "b": lb, "n_shared": len(pairs), "accuracy_a": round(acc_a, 6), "accuracy_b": round(acc_b, 6),
            "mcnemar": {**mc, "test": "exact McNemar (two-sided binomial on the discordant items)"},
            "macro_f1_paired_bootstrap": f1, "b_beats_a_95": beats,
            "verdict": verdict(la, lb, mc) + f" Macro-F1 of {lb} minus {la}: {f1['diff']:+.4f} "
                                             f"(95 % interval {f1['ci95'][0]:+.4f} to {f1['ci95'][1]:+.4f}, {f1_word})."}


@dataclass(frozen=True)
class Attachments:
    """What a report carries besides the bench runs: files appended as sections (``includes``), release
    evidence for the ship-or-not verdict (``evidence``: GGUF, quantization and audit artifacts), and two
    `tools eval general` runs, base then tuned (``general``)."""
    includes: tuple = ()
    evidence: tuple = ()
    general: tuple = ()


def run_report(bench_dirs, out, *, labels=(), title: str = DEFAULT_TITLE, seed: int = 0,
               attach: Attachments = Attachments(), force: bool = False) -> Artifact:
    """`tools report`: put bench runs side by side on the same items: accuracy, valid-response rate,
    macro-F1, each with its 95 % interval; every run after the first is tested against the first on the
    shared items (exact McNemar on accuracy, paired bootstrap on macro-F1). With evidence the report opens
    with the ship-or-not verdict (evals/verdict.py); with two general runs it adds their paired difference
    and a verdict line. Artifact ``report.compare``."""
    if labels and len(labels) != len(bench_dirs):
        raise UserError(f"{len(labels)} labels for {len(bench_dirs)} runs", field="--label")
    labels = list(labels) or [Path(d).name for d in bench_dirs]
    runs = [(lab, *_load(d)) for lab, d in zip(labels, bench_dirs)]
    table = compare_rows(runs)
    tests = [paired(runs[0], r, seed=seed) for r in runs[1:]]
    if attach.evidence and not tests:
        raise UserError("a verdict needs two runs (the base first)", field="--evidence")
    verdict = verdict_block(tests[0], [read_artifact(e) for e in attach.evidence]) if attach.evidence else None
    if attach.general and len(attach.general) != 2:
        raise UserError("--general takes two `tools eval general` runs: base, then tuned", field="--general")
    gen = paired_delta(*attach.general, seed=seed) if attach.general else None
    params = {"labels": labels, "title": title, **({"seed": seed} if seed else {})}
    if gen:  # a new parameter: reports without it keep their fingerprints
        params["general"] = [str(Path(g).resolve()) for g in attach.general]
    inputs = [*bench_dirs, *attach.includes, *attach.evidence, *attach.general]
    with Stage("report.compare", out, params, inputs=inputs, force=force) as st:
        if not st.skipped:
            # timings stay out of the data file (DESIGN: times live only in the manifest)
            doc = {"title": title, "runs": [{k: v for k, v in r.items() if k != "s_per_item"} for r in table],
                   "comparisons": tests}
            if tests:
                doc["mcnemar"] = {"a": tests[0]["a"], "b": tests[0]["b"], **tests[0]["mcnemar"]}
                doc["b_beats_a_95"] = tests[0]["b_beats_a_95"]
                doc["verdict"] = tests[0]["verdict"]
            if verdict:
                doc["ship"] = verdict
                st.extra["ship"] = verdict["decision"]
            lines = _markdown(title, runs, table, tests, verdict)
            if gen:
                doc["general"] = gen
                lines += ["## General ability (held-out general English, same windows)", "", gen["verdict"], ""]
                st.extra["general"] = gen["verdict"]
            write_json(st.path("compare.json"), doc)
            _plot(table, st.path("compare.png"), title)
            st.path("report.md").write_text("\n".join(lines + _included(attach.includes)))
            gold = [row["gold"] for row in runs[0][2]]
            maj = max(sorted(set(gold)), key=gold.count)
            st.extra["runs"] = {r["run"]: {"accuracy": r["accuracy"], "valid_rate": r["valid_rate"],
                                           "s_per_item": r["s_per_item"]} for r in table}
            st.extra["majority_rate"] = gold.count(maj) / len(gold)
    return st.result


def _pct(x, ci=None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f} %" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _markdown(title: str, runs: list, table: list[dict], tests: list[dict], verdict: dict | None) -> list[str]:
    """report.md: the verdict (when asked), the runs table, the paired tests, the majority class."""
    lines = [f"# {title}", ""]
    if verdict:
        lines += verdict_markdown(verdict)
    lines += [f"Task: {runs[0][1]['task']}, split {runs[0][1].get('split')}, {table[0]['n']} items in the first run.",
              "", "| run | model | accuracy [95 % CI] | valid (lenient) [95 % CI] | valid (strict) | "
              "macro-F1 [95 % CI] | s/item |", "|---|---|---|---|---|---|---|"]
    for r in table:
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}" + (
            f" [{r['macro_f1_ci95'][0]:.3f}, {r['macro_f1_ci95'][1]:.3f}]" if r.get("macro_f1_ci95") else "")
        spi = "-" if r["s_per_item"] is None else f"{r['s_per_item']:.2f}"
        lines.append(f"| {r['run']} | {r['model']} | {_pct(r['accuracy'], r.get('accuracy_ci95'))} | "
                     f"{_pct(r['valid_rate'], r.get('valid_rate_ci95'))} | {_pct(r['valid_strict'])} | {f1} | {spi} |")
    if tests:
        lines += ["", "## Paired tests (on the items both runs answered)", "",
                  "| A | B | items | A right, B wrong | A wrong, B right | McNemar p | "
                  "macro-F1 B − A [95 % CI] | B beats A at 95 % |", "|---|---|---|---|---|---|---|---|"]
        for t in tests:
            mc, f = t["mcnemar"], t["macro_f1_paired_bootstrap"]
            lines.append(f"| {t['a']} | {t['b']} | {t['n_shared']} | {mc['a_right_b_wrong']} | "
                         f"{mc['a_wrong_b_right']} | {mc['p']:.4g} | {f['diff']:+.3f} "
                         f"[{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}] | {'yes' if t['b_beats_a_95'] else 'no'} |")
        lines += ["", *[t["verdict"] for t in tests]]
    gold = [row["gold"] for row in runs[0][2]]
    maj = max(sorted(set(gold)), key=gold.count)
    return lines + ["", f"Majority class on these items: {maj!r} ({100 * gold.count(maj) / len(gold):.1f} %).", "",
                    "![comparison](compare.png)", ""]


def _included(files) -> list[str]:
    """Sections for ``--include`` files, titled by folder/name (Markdown as is, other text fenced)."""
    out = []
    for f in map(Path, files):
        try:
            text = f.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise UserError("not UTF-8 text", path=str(f), field="--include") from None
        out += [f"## {f.parent.name}/{f.name}", ""]
        out += [text, ""] if f.suffix == ".md" else ["```", text, "```", ""]
    return out


def _plot(table: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    metrics = [("accuracy", "accuracy"), ("valid_rate", "valid (lenient)"), ("valid_strict", "valid (strict)")]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    w = 0.8 / len(table)
    cis = {"accuracy": "accuracy_ci95", "valid_rate": "valid_rate_ci95"}
    for i, r in enumerate(table):
        vals = [100 * (r[m] or 0) for m, _ in metrics]
        err = [[max(0.0, v - 100 * (r.get(cis.get(m, "")) or [v / 100, v / 100])[0]) for v, (m, _) in zip(vals, metrics)],
               [max(0.0, 100 * (r.get(cis.get(m, "")) or [v / 100, v / 100])[1] - v) for v, (m, _) in zip(vals, metrics)]]
        bars = ax.bar([j + i * w for j in range(len(metrics))], vals, w, label=r["run"], yerr=err, capsize=3,
                      error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + w * (len(table) - 1) / 2 for j in range(len(metrics))], [m[1] for m in metrics])
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
