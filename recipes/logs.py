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


def plot_loss(history: list[dict], out_png: str | Path, title: str) -> dict:
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
    ax.legend()
    fig.tight_layout()
    save_png(fig, out_png)
    return {"train_points": len(train), "eval_points": len(evals),
            "final_train_loss": train[-1][1] if train else None,
            "final_eval_loss": evals[-1][1] if evals else None}


def plot_stage(stage_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict]:
    """`tools plot`: the loss curve of a trained stage, written to ``out`` (default STAGE_DIR/loss.png)."""
    hist = load_log_history(stage_dir)
    out = Path(out) if out else Path(stage_dir) / "loss.png"
    return out, plot_loss(hist, out, f"Loss: {Path(stage_dir).name}")
