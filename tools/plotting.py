"""Reproducible PNG plots: the Agg backend, and files with no timestamp or software tag inside
(same data -> same bytes), written atomically."""
from __future__ import annotations

import os
from pathlib import Path

PNG_META = {"Software": None}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as a byte-reproducible PNG (temp file + rename) and close it."""
    plt = pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=PNG_META)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
