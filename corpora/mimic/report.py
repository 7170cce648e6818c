"""The corpus report: the bar chart of note lengths (``lengths.png``)."""
from __future__ import annotations

from pathlib import Path

from tools.plotting import pyplot, save_png


def preload_pyplot() -> None:
    """Import matplotlib's pyplot (about a second) while the workers clean notes."""
    pyplot()


def plot_lengths(hist: dict, out: Path, title: str) -> None:
    """A bar chart of document lengths (power-of-two buckets of JSON-line length)."""
    plt = pyplot()
    keys = list(hist)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(range(len(keys)), [hist[k] for k in keys], color="#4477aa")
    ax.set_xticks(range(len(keys)), [f">={int(k):,}" for k in keys], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("documents")
    ax.set_xlabel("characters per document")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, out, dpi=100)

