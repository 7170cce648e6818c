"""Training logs: the log history of a trained stage and its loss curve (`tools plot`)."""
from __future__ import annotations

import json
from pathlib import Path

from tools.errors import UserError
from tools.plotting import pyplot, save_png


def load_log_history(stage_dir: str | Path) -> list[dict]:
    d = Path(stage_dir)
    for cand in (d / "output" / "log_history.json", d / "log_history.json"):
        if cand.is_file():
            try:
                hist = json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"unreadable log history ({e.msg})", path=str(cand)) from None
            if isinstance(hist, dict):
                hist = hist.get("log_history", [])
            if hist:
                return hist
    for cand in (d / "output" / "trainer_state.json", d / "trainer_state.json"):
        if cand.is_file():
            hist = json.loads(cand.read_text()).get("log_history", [])
            if hist:
                return hist
    raise UserError("no training logs (log_history.json or trainer_state.json): train the stage first "
                    "with `tools train`", path=str(d))


def plot_loss(history: list[dict], out_png: str | Path, title: str, selection: dict | None = None) -> dict:
    """Train (and eval) loss per step; with a `--select-by` record, dev accuracy per checkpoint (95 %
    intervals) on a second axis, the chosen checkpoint marked."""
    plt = pyplot()

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        raise UserError("log history has no loss entries", field="log_history")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="o", ms=3)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="s", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if selection and selection.get("checkpoints"):
        _plot_accuracy(ax.twinx(), selection, handles, labels)
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    save_png(fig, out_png)
    return {"train_points": len(train), "eval_points": len(evals),
            "final_train_loss": train[-1][1] if train else None,
            "final_eval_loss": evals[-1][1] if evals else None}


def _plot_accuracy(ax, selection: dict, handles: list, labels: list) -> None:
    pts = selection["checkpoints"]
    steps = [p["step"] for p in pts]
    acc = [p["accuracy"] for p in pts]
    err = [[a - p["accuracy_ci95"][0] for a, p in zip(acc, pts)], [p["accuracy_ci95"][1] - a for a, p in zip(acc, pts)]]
    h = ax.errorbar(steps, acc, yerr=err, color="tab:green", marker="D", ms=4, capsize=3, lw=1)
    best = next(p for p in pts if p["step"] == selection["chosen_step"])
    star = ax.scatter([best["step"]], [best["accuracy"]], s=120, marker="*", color="tab:red", zorder=5)
    ax.set_ylabel(f"dev accuracy ({selection.get('by')})")
    ax.set_ylim(0, 1)
    handles += [h, star]
    labels += [f"dev accuracy, n={selection.get('n')} (95 % CI)", f"chosen: step {best['step']}"]


def load_selection(stage_dir: str | Path) -> dict | None:
    """The `--select-by` record of a trained stage's manifest (None without one)."""
    man = Path(stage_dir) / "output" / "manifest.json"
    if not man.is_file():
        return None
    try:
        return (json.loads(man.read_text(encoding="utf-8")).get("extra") or {}).get("selection")
    except ValueError:
        raise UserError("unreadable manifest", path=str(man)) from None


def plot_stage(stage_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict]:
    """`tools plot`: the loss curve of a trained stage, written to ``out`` (default STAGE_DIR/loss.png)."""
    hist = load_log_history(stage_dir)
    out = Path(out) if out else Path(stage_dir) / "loss.png"
    sel = load_selection(stage_dir)
    info = plot_loss(hist, out, f"Loss: {Path(stage_dir).name}", sel)
    if sel:
        info["selection"] = {"by": sel["by"], "chosen_step": sel["chosen_step"],
                             "accuracy": {p["step"]: p["accuracy"] for p in sel["checkpoints"]}}
    return out, info
