"""audit.md and audit.png of `tools audit`, rendered from audit.json's figures (no secret in either)."""
from __future__ import annotations

from pathlib import Path

from tools.plotting import pyplot, save_png


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def render_audit(res: dict) -> str:
    ex, mi = res["extraction"], res["membership"]
    base = res.get("base")
    L = [f"# Memorization audit of {res['model']['name']} ({res['model']['kind']})", "",
         f"**{'PASS' if res['passed'] else 'FAIL'}**" + (f" (base model: {base['name']})" if base else " (no base)"),
         "", "| check | figure | value | limit | result |", "|---|---|---|---|---|"]
    for c in res["checks"]:
        L.append(f"| {c['check']} | {c['figure']} | {c['value']:.4g} | {c['limit']:.4g} | "
                 f"{'pass' if c['pass'] else 'FAIL'} |")
    b = ex.get("base")
    L += ["", "## Extraction", "",
          f"Greedy continuation of the first {ex['prefix_tokens']} tokens of {ex['n']} training documents "
          f"reproduces the next {ex['suffix_tokens']} verbatim for {ex['extracted']} "
          f"({_pct(ex['rate'])}, 95 % interval {_pct(ex['ci95'][0])} to {_pct(ex['ci95'][1])})"
          + (f"; the base model for {b['extracted']} of {b['n']} ({_pct(b['rate'])})." if b else "."), "",
          "## Membership inference", "",
          f"Mean loss {mi['mean_loss_train']:.4f} on {mi['loss']['n_pos']} training documents, "
          f"{mi['mean_loss_heldout']:.4f} on {mi['loss']['n_neg']} held-out ones.", "",
          "| score | AUC | 95 % interval (Hanley-McNeil) |", "|---|---|---|",
          f"| loss | {mi['loss']['auc']:.3f} | {_ci(mi['loss']['ci95'])} |"]
    if "relative" in mi:
        L.append(f"| loss relative to the base | {mi['relative']['auc']:.3f} | {_ci(mi['relative']['ci95'])} |")
    L += ["", "AUC 0.5: training and held-out documents look alike to the model; 1.0: every training document "
          "is told apart.", ""]
    can = res["canaries"]
    if can["items"]:
        L += ["## Canaries", "",
              f"{can['n']} canaries, each ranked among {can['candidates']} random secrets of its shape "
              f"(space {can['space_bits']:.1f} bits). Exposure = log2(space) - log2(rank); beyond the sample, "
              "from a skew-normal fit.", "",
              "| canary | documents | rank | exposure (bits) | greedy recites it |" +
              (" base exposure (bits) |" if can.get("base_items") else ""),
              "|---|---|---|---|---|" + ("---|" if can.get("base_items") else "")]
        for i, c in enumerate(can["items"]):
            row = (f"| {c['index']} | {c['documents']} | {c['rank']} | {c['exposure']:.1f} | "
                   f"{'yes' if c['extracted'] else 'no'} |")
            if can.get("base_items"):
                row += f" {can['base_items'][i]['exposure']:.1f} |"
            L.append(row)
        L.append("")
    L += ["![audit](audit.png)", ""]
    return "\n".join(L)


def plot_audit(res: dict, losses: dict, path: Path) -> None:
    """Loss distributions (train vs held-out), extraction rates (model vs base), canary exposures."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    ax = axes[0]
    ax.hist([losses["train"], losses["heldout"]], bins=20, label=["training docs", "held-out docs"])
    ax.set_xlabel("mean loss per token (nats)")
    ax.set_title(f"membership: AUC {res['membership']['loss']['auc']:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    ex = res["extraction"]
    names, vals = ["model"], [100 * ex["rate"]]
    if ex.get("base"):
        names.append("base")
        vals.append(100 * ex["base"]["rate"])
    ax.bar(names, vals, color=["tab:red", "tab:gray"][:len(vals)])
    ax.set_ylabel("% of documents")
    ax.set_ylim(0, 100)
    ax.set_title(f"extraction ({ex['prefix_tokens']}+{ex['suffix_tokens']} tokens, {ex['n']} docs)", fontsize=10)
    ax = axes[2]
    items = res["canaries"]["items"]
    if items:
        ax.bar([str(c["index"]) for c in items], [c["exposure"] for c in items], color="tab:red", label="model")
        if res["canaries"].get("base_items"):
            ax.plot([str(c["index"]) for c in items], [c["exposure"] for c in res["canaries"]["base_items"]], "ko",
                    label="base")
        ax.axhline(res["limits"]["max_exposure"], color="k", ls="--", lw=0.8, label="limit")
        ax.axhline(res["canaries"]["space_bits"], color="tab:gray", ls=":", lw=0.8, label="all secrets")
        ax.legend(fontsize=8)
    ax.set_xlabel("canary")
    ax.set_ylabel("exposure (bits)")
    ax.set_title("canaries" if items else "no canaries in the corpus", fontsize=10)
    fig.suptitle(f"memorization audit: {'PASS' if res['passed'] else 'FAIL'}", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
