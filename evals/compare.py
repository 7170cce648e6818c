"""`tools report BENCH_DIR...`: bench runs side by side on the same items (base vs fine-tuned)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from tools.errors import UserError


def _load(d: str) -> tuple[dict, list[dict], dict]:
    from tools.artifact import read_artifact
    from tools.io import read_jsonl

    art = read_artifact(d, stage=("bench.",))
    res = json.loads((art.path / "results.json").read_text())
    rows = list(read_jsonl(art.path / "items.jsonl"))
    return res, rows, art.extra


def compare_rows(runs: list[tuple[str, dict, list[dict], dict]]) -> list[dict]:
    ids0 = [r["id"] for r in runs[0][2]]
    for label, res, rows, _ in runs[1:]:
        if [r["id"] for r in rows] != ids0:
            raise UserError(f"{label} was not run on the same items as {runs[0][0]} (use the same --limit/--split)",
                            field="BENCH_DIR")
        if res["task"] != runs[0][1]["task"]:
            raise UserError(f"{label} is a {res['task']} run, {runs[0][0]} a {runs[0][1]['task']} run", field="BENCH_DIR")
    table = []
    for label, res, rows, extra in runs:
        table.append({"run": label, "model": res["model"]["name"], "mode": res.get("mode"), "n": res["n"],
                      "accuracy": res["accuracy"], "valid_rate": res.get("valid_rate"),
                      "valid_strict": (res.get("valid_rates") or {}).get("strict"),
                      "macro_f1": res.get("macro_f1"),
                      "s_per_item": (extra.get("timing") or {}).get("s_per_item")})
    return table


@click.command("report")
@click.argument("bench_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--label", "labels", multiple=True, help="Column label per run (default: folder names).")
@click.option("--title", default="MediLoRA: base vs fine-tuned under the MediLoRA protocol", show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Report artifact folder (report.md + compare.png).")
@click.option("--force", is_flag=True)
def report_cmd(bench_dirs, labels, title, out, force):
    """Put bench runs side by side on the same items: accuracy, valid-response rate, macro-F1.

    \b
    Example:
      tools report runs/demo/bench_base runs/demo/bench_tuned --label base --label tuned --out runs/demo/report
    """
    from evals.report import plot_bars  # noqa: F401  (same plotting style as bench reports)
    from tools.artifact import Stage
    from tools.io import write_json

    if labels and len(labels) != len(bench_dirs):
        raise UserError(f"{len(labels)} labels for {len(bench_dirs)} runs", field="--label")
    labels = list(labels) or [Path(d).name for d in bench_dirs]
    runs = [(lab, *_load(d)) for lab, d in zip(labels, bench_dirs)]
    table = compare_rows(runs)
    with Stage("report.compare", out, {"labels": labels, "title": title}, inputs=list(bench_dirs), force=force) as st:
        if not st.skipped:
            # timings stay out of the data file (DESIGN: times live only in the manifest)
            write_json(st.path("compare.json"), {"title": title, "runs": [
                {k: v for k, v in r.items() if k != "s_per_item"} for r in table]})
            _plot(table, st.path("compare.png"), title)
            lines = [f"# {title}", "", f"Task: {runs[0][1]['task']}, split {runs[0][1].get('split')}, "
                     f"the same {table[0]['n']} items for every run.", "",
                     "| run | model | accuracy | valid (lenient) | valid (strict) | macro-F1 | s/item |",
                     "|---|---|---|---|---|---|---|"]
            for r in table:
                def pct(x):
                    return "-" if x is None else f"{100 * x:.1f} %"
                f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}"
                spi = "-" if r["s_per_item"] is None else f"{r['s_per_item']:.2f}"
                lines.append(f"| {r['run']} | {r['model']} | {pct(r['accuracy'])} | {pct(r['valid_rate'])} | "
                             f"{pct(r['valid_strict'])} | {f1} | {spi} |")
            gold = [row["gold"] for row in runs[0][2]]
            maj = max(set(gold), key=gold.count)
            lines += ["", f"Majority class on these items: {maj!r} ({100 * gold.count(maj) / len(gold):.1f} %).", "",
                      "![comparison](compare.png)", ""]
            st.path("report.md").write_text("\n".join(lines))
            st.extra["runs"] = {r["run"]: {"accuracy": r["accuracy"], "valid_rate": r["valid_rate"],
                                           "s_per_item": r["s_per_item"]} for r in table}
            st.extra["majority_rate"] = gold.count(maj) / len(gold)
    click.echo(Path(out, "report.md").read_text())


def _plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("accuracy", "accuracy"), ("valid_rate", "valid (lenient)"), ("valid_strict", "valid (strict)")]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    w = 0.8 / len(table)
    for i, r in enumerate(table):
        vals = [100 * (r[m] or 0) for m, _ in metrics]
        bars = ax.bar([j + i * w for j in range(len(metrics))], vals, w, label=r["run"])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + w * (len(table) - 1) / 2 for j in range(len(metrics))], [m[1] for m in metrics])
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
