"""Markdown reports and PNG plots rendered from the results JSON (never the other way round).

Plots go through tools.plotting (Agg backend, no timestamp metadata), so the same results give
byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

from tools.io import atomic_write
from tools.plotting import pyplot, save_png


def plot_confusion(conf: dict, path: Path, title: str) -> None:
    plt = pyplot()
    labels, cols, mat = conf["labels"], conf["columns"], conf["matrix"]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 1.0 * len(labels) + 1.6))
    ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    hi = max((max(r) for r in mat), default=0)
    for i, r in enumerate(mat):
        for j, v in enumerate(r):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if hi and v > hi / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)


def plot_hist(values: list[float], path: Path, title: str, xlabel: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=min(30, max(5, len(set(values)))), color="#4477aa")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")
    fig.tight_layout()
    save_png(fig, path)


def plot_bars(names: list[str], values: list[float], path: Path, title: str, ref: float | None = None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), values, color="#4477aa")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    if ref is not None:
        ax.axvline(ref, color="#cc6677", linestyle="--", label=f"chance {ref:.2f}")
        ax.legend(loc="lower right")
    for i, v in enumerate(values):
        ax.text(min(v + 0.01, 0.93), i, f"{v:.3f}", va="center")
    ax.set_title(title)
    ax.set_xlabel("accuracy")
    fig.tight_layout()
    save_png(fig, path)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ci_pct(ci) -> str:
    """A " [lo, hi]" suffix in percent (empty when there is no interval)."""
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _ci(r: dict, key: str) -> str:
    ci = r.get(key)
    return "-" if not ci else f"{100 * ci[0]:.1f} – {100 * ci[1]:.1f}%"


def render_bench_report(results: dict, rows: list[dict], folder: Path, plots: bool = True) -> None:
    folder = Path(folder)
    r = results
    lines = [f"# {r['task']} benchmark ({r['mode']})", "",
             f"- model: `{r['model']['name']}` (sha256 `{r['model']['sha256'][:16]}…`)",
             f"- data: split `{r['split']}`, {r['n']} items (sha256 `{r['data']['sha256'][:16]}…`)",
             f"- seed {r['seed']}, prompt template: {r['prompt']['template']}"]
    if r.get("shots"):
        sh = r["shots"]
        lines.append(f"- {sh['k']}-shot from `{Path(sh['source']['path']).name}` (ids {', '.join(sh['ids'])}"
                     + ("; stratified by label" if sh.get("stratified") else "") + ")"
                     + (f"; {sh['items_with_fewer_shots']} items got fewer shots to fit n_ctx (down to "
                        f"{sh['min_shots_used']})" if sh.get("items_with_fewer_shots") else ""))
    if r.get("cot"):
        lines.append("- chain of thought: reasoning, then a final `Answer: X` line (the only form that counts)")
    if r.get("self_consistency"):
        sc = r["self_consistency"]
        lines.append(f"- self-consistency: majority of {sc['samples']} samples per item; {sc['ties']} tied votes "
                     f"(broken by the {sc['tie_rule']}), {sc['unanimous']} unanimous items, "
                     f"{_pct(sc['valid_sample_rate'])} of samples with a parsed answer")
    lines += ["", "| metric | value | 95 % interval |", "|---|---|---|",
              f"| accuracy | {_pct(r['accuracy'])} | {_ci(r, 'accuracy_ci95')} |"]
    if r["mode"] == "generate":
        lines += [f"| accuracy (strict answers only) | {_pct(r['accuracy_strict'])} | |",
                  f"| valid-response rate, strict | {_pct(r['valid_rates']['strict'])} | |",
                  f"| valid-response rate, lenient | {_pct(r['valid_rates']['lenient'])} | {_ci(r, 'valid_rate_ci95')} |"]
    else:
        lines += [f"| accuracy, length-normalised | {_pct(r['accuracy_norm'])} | {_ci(r, 'accuracy_norm_ci95')} |"]
    mf = r.get("macro_f1_ci95")
    lines += [f"| macro-F1 | {r['macro_f1']:.4f} | {'-' if not mf else f'{mf[0]:.4f} – {mf[1]:.4f}'} |", "",
              "Intervals: Wilson score for proportions, a seeded bootstrap over items (1000 resamples) for macro-F1.",
              "",
              "## Per label", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for lab, v in r["per_label"].items():
        lines.append(f"| {lab} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    conf = r["confusion"]
    lines += ["", "## Confusion matrix (rows gold, columns predicted)", "",
              "| gold \\ predicted | " + " | ".join(conf["columns"]) + " |",
              "|---" * (len(conf["columns"]) + 1) + "|"]
    for lab, row in zip(conf["labels"], conf["matrix"]):
        lines.append(f"| {lab} | " + " | ".join(map(str, row)) + " |")
    if r["mode"] == "generate":
        s = r["sampling"]
        lines += ["", "## Sampling", "", ", ".join(f"{k}={s[k]}" for k in sorted(s)) +
                  f"; max_tokens={r['max_tokens']}, full_answer={r['full_answer']}"]
        finishes: dict[str, int] = {}
        for row in rows:
            for smp in row.get("samples") or [row]:
                finishes[smp["finish"]] = finishes.get(smp["finish"], 0) + 1
        lines += ["", "Generation ended: " + ", ".join(f"{k} {v}" for k, v in sorted(finishes.items()))]
    lines += ["", f"Prompt tokens: {r['tokens']['prompt_total']} in all, {r['tokens']['prompt_mean']} on average."]
    if plots:
        lines += ["", "![confusion](confusion.png)"]
        plot_confusion(conf, folder / "confusion.png", f"{r['task']} {r['mode']}: confusion\naccuracy "
                       f"{_pct(r['accuracy'])}{ci_pct(r.get('accuracy_ci95'))}, n={r['n']}")
        if r["mode"] == "generate":
            plot_hist([row["gen_tokens"] for row in rows], folder / "lengths.png",
                      "response length", "generated tokens")
            lines += ["![response lengths](lengths.png)"]
        else:
            margins = []
            for row in rows:
                ll = row["loglik"]
                others = [v for k, v in ll.items() if k != row["gold"]]
                margins.append(ll[row["gold"]] - max(others))
            plot_hist(margins, folder / "margins.png", "log-likelihood margin of the gold answer", "nats")
            lines += ["![gold margins](margins.png)"]
    with atomic_write(folder / "report.md") as f:
        f.write("\n".join(lines) + "\n")


def render_mmlu_report(results: dict, folder: Path, plots: bool = True) -> None:
    folder = Path(folder)
    r = results
    lines = [f"# MMLU-medical ({r['shots']}-shot, lm-eval {r['lm_eval_version']})", "",
             f"- model: `{r['model']['name']}` ({r['model']['backend']})", f"- items: {r['n']}", "",
             "| subject | n | accuracy |", "|---|---|---|"]
    for s, v in r["subjects"].items():
        lines.append(f"| {s.replace('_', ' ')} | {v['n']} | {_pct(v['accuracy'])} |")
    lines += [f"| **average (macro, over subjects)** | {r['n']} | **{_pct(r['accuracy_macro'])}** |",
              f"| average (micro, over questions) | {r['n']} | {_pct(r['accuracy'])} |", ""]
    if plots:
        names = list(r["subjects"])
        plot_bars([s.replace("_", " ") for s in names], [r["subjects"][s]["accuracy"] for s in names],
                  folder / "subjects.png", f"MMLU-medical, {r['shots']}-shot", ref=0.25)
        lines += ["![per-subject accuracy](subjects.png)"]
    with atomic_write(folder / "report.md") as f:
        f.write("\n".join(lines) + "\n")


def plot_intervals(names: list[str], values: list[float], cis: list[list[float]], path: Path, title: str) -> None:
    """Horizontal bars with their 95 % intervals."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(names) + 1.5))
    err = [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]]
    ax.barh(range(len(names)), values, xerr=err, color="#4477aa", ecolor="#222222", capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    for i, (v, c) in enumerate(zip(values, cis)):
        ax.text(c[1] + 0.015, i, f"{100 * v:.1f}", va="center")
    ax.set_title(title)
    ax.set_xlabel("accuracy (95 % Wilson interval)")
    fig.tight_layout()
    save_png(fig, path)


def suite_rows(r: dict, why_key: str = "skipped"):
    """A suite run's tasks in leaderboard order: (column title, figures or None, why not run or None).

    `why_key` names the results' task -> reason map ("skipped" for open-medical, "not_run" for meditron)."""
    for name in r["order"]:
        yield r["columns"][name], r["tasks"].get(name), r[why_key].get(name)


def _write_suite_report(folder: Path, lines: list[str], r: dict, acc: str, title: str, plots: bool) -> None:
    """report.md of a suite run, with the per-task interval plot (suite.png) under it when `plots`."""
    if plots:
        names = [n for n in r["order"] if n in r["tasks"]]
        plot_intervals([r["columns"][n] for n in names], [r["tasks"][n][acc] for n in names],
                       [r["tasks"][n][f"{acc}_ci95"] for n in names], folder / "suite.png",
                       f"{title}: {r['model']['name']}")
        lines += ["![per-task accuracy](suite.png)"]
    with atomic_write(folder / "report.md") as f:
        f.write("\n".join(lines) + "\n")


def suite_table(r: dict) -> list[str]:
    """The per-task Markdown table of a suite run: task, n, acc [95 %], acc_norm, data; then the average."""
    lines = ["| task | n | acc | 95 % interval | acc_norm | data |", "|---|---|---|---|---|---|"]
    for col, v, why in suite_rows(r):
        if why is not None:
            lines.append(f"| {col} | - | - | - | - | skipped: {why} |")
            continue
        lines.append(f"| {col} | {v['n']} | {_pct(v['acc'])} | {_ci(v, 'acc_ci95')} | {_pct(v['acc_norm'])} | "
                     f"{v['data']['source']} `{Path(v['data']['path']).name}` |")
    lines.append(f"| **Average** ({len(r['average_over'])} tasks, unweighted) | {r['n']} | **{_pct(r['average'])}** "
                 "| | | |")
    return lines


def leaderboard_row(r: dict, label: str) -> list[str]:
    """The run as one row laid out like the Open Medical-LLM Leaderboard (Average, then its columns)."""
    cols = [r["columns"][n] for n in r["order"]]
    cells = ["-" if n in r["skipped"] else f"{100 * r['tasks'][n]['acc']:.1f}" for n in r["order"]]
    return ["| Model | Average | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|",
            f"| {label} | {100 * (r['average'] or 0):.1f} | " + " | ".join(cells) + " |"]


def render_suite_report(results: dict, folder: Path, plots: bool = True) -> None:
    folder = Path(folder)
    r = results
    lim = f", first {r['limit']} questions of each task" if r["limit"] else ""
    lines = [f"# Open Medical-LLM suite (zero-shot log-likelihood, lm-eval {r['lm_eval_version']} task files{lim})",
             "", f"- model: `{r['model']['name']}` (sha256 `{r['model']['sha256'][:16]}…`)",
             f"- metric: {r['metric']}; acc_norm where lm-eval's task defines it", "", *suite_table(r), "",
             "## Leaderboard layout", "", *leaderboard_row(r, r["model"]["name"]), ""]
    _write_suite_report(folder, lines, r, "acc", "Open Medical-LLM suite", plots)


def meditron_table(r: dict) -> list[str]:
    """The per-task Markdown table of a meditron run: mean over seeds, SD, interval, per seed, unparseable."""
    lines = ["| task | n | accuracy (mean over seeds) | SD over seeds (points) | 95 % interval | per seed | unparseable | "
             "accuracy on parsed |", "|---|---|---|---|---|---|---|---|"]
    for col, v, why in suite_rows(r, "not_run"):
        if v is None:
            lines.append(f"| {col} | - | - | - | - | - | - | not run: {why} |")
            continue
        sd = f"{100 * v['accuracy_sd']:.1f}" if v["accuracy_sd"] is not None else "-"
        seeds = " / ".join(_pct(p["accuracy"]) for p in v["per_seed"])
        lines.append(f"| {col} | {v['n']} | {_pct(v['accuracy'])} | {sd} | {_ci(v, 'accuracy_ci95')} | {seeds} | "
                     f"{v['unparseable']} ({_pct(v['unparseable_rate'])}) | {_pct(v['accuracy_parsed'])} |")
    sd = f"{100 * r['average_sd']:.1f}" if r["average_sd"] is not None else "-"
    lines.append(f"| **Average** ({len(r['average_over'])} tasks, unweighted) | {r['n']} | **{_pct(r['average'])}** "
                 f"| {sd} | | | | |")
    return lines


def meditron_row(r: dict, label: str) -> list[str]:
    """The run as one row laid out like Meditron's table (its columns, then Avg)."""
    cols = [r["columns"][n] for n in r["order"]]
    cells = [f"{100 * r['tasks'][n]['accuracy']:.1f}" if n in r["tasks"] else "-" for n in r["order"]]
    return ["| Model | " + " | ".join(cols) + " | Avg |", "|---" * (len(cols) + 2) + "|",
            f"| {label} | " + " | ".join(cells) + f" | {100 * r['average']:.1f} |"]


def render_meditron_report(results: dict, folder: Path, plots: bool = True) -> None:
    r, folder = results, Path(folder)
    lim = f", first {r['limit']} questions of each task (MMLU: of each subject)" if r["limit"] else ""
    mode = ("self-consistency " if r["samples"] > 1 else "") + ("CoT, " if r["cot"] else "")
    p = r["protocol"]
    lines = [f"# Meditron protocol ({mode}{r['shots']}-shot over {len(r['seeds'])} seeds{lim})", "",
             f"- model: `{r['model']['name']}` (sha256 `{r['model']['sha256'][:16]}…`)",
             f"- metric: {r['metric']}; " + (f"{r['samples']} samples an item, majority vote (self-consistency)"
                                              if r["samples"] > 1 else "one sample an item"),
             f"- prompts: MediLoRA chat ({p['prompt_format']}), top-k {p['sampling']['top_k']}, temperature "
             f"{p['sampling']['temperature']}, at most {p['max_tokens']} new tokens; shots drawn per seed, never "
             "a test item", "", *meditron_table(r), "", "## Meditron layout", "", *meditron_row(r, r["model"]["name"]),
             ""]
    _write_suite_report(folder, lines, r, "accuracy", "Meditron protocol", plots)
