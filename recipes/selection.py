"""`tools train --select-by`: the training side of choosing a checkpoint by dev accuracy.

With a selector, `tools train` keeps every checkpoint (Axolotl's ``save_total_limit`` is lifted on
its command line, the stage's axolotl.yaml is untouched), hands the whole ones to the selector when
Axolotl is done, and puts the chosen checkpoint's weights into ``output/`` in place of the last
step's, so `tools merge`, `tools stage sft --from` and everything after use the chosen one. The
record (every checkpoint's accuracy with its 95 % interval, the chosen step) goes into the train
manifest as ``extra.selection``, the per-item rows into ``output/selection.jsonl``, and loss.png
gets the accuracy per checkpoint next to the loss.

The scoring is evaluation, so it lives in evals (evals/select.py); recipes cannot import evals, so
evals.cli registers its factory here (:func:`register`) when the CLI starts, and Python callers
pass ``evals.select.selector(SPEC)`` to ``train_stage(..., select=...)`` themselves.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from tools.errors import UserError

KEEP_ALL = {"save_total_limit": 100000}  # every checkpoint of the run stays until the choice is made
_FACTORY: list[Callable] = []


def register(factory: Callable) -> None:
    """Set the selector factory (``evals.select.selector``): SPEC -> fn(checkpoints, base_model, rows_out,
    train_files)."""
    _FACTORY[:] = [factory]


def selector(spec: str | None):
    """The selector of ``--select-by SPEC`` (None without one); refuses test items before training."""
    if not spec:
        return None
    if not _FACTORY:
        raise UserError("--select-by needs the evals package (run it through the `tools` CLI)", field="--select-by")
    return _FACTORY[0](spec)


def _is_weights(name: str) -> bool:
    """The files of a checkpoint that are the model or adapter (not optimizer, scheduler, RNG, state)."""
    return (name.startswith(("adapter_model", "model", "pytorch_model")) and name.endswith((".safetensors", ".bin",
                                                                                             ".json"))
            or name in ("adapter_config.json", "config.json"))


def apply_choice(chosen: Path, work: Path) -> list[str]:
    """Copy the chosen checkpoint's weights over the final ones in ``work``; the names copied."""
    copied = []
    for f in sorted(chosen.iterdir()):
        if f.is_file() and _is_weights(f.name):
            shutil.copy2(f, work / f.name)
            copied.append(f.name)
    if not any(n.endswith((".safetensors", ".bin")) for n in copied):
        raise UserError("the chosen checkpoint holds no weights", path=str(chosen))
    return copied


def _train_files(cfg: dict) -> tuple[str, ...]:
    return tuple(str(d["path"]) for d in cfg.get("datasets") or [] if isinstance(d, dict) and d.get("path"))


def check_before_training(select, cfg: dict) -> None:
    """Refuse now, not after hours of training, a selection left with no item once the stage's own
    training items are taken out."""
    if select is not None and hasattr(select, "check"):
        select.check(_train_files(cfg))


def run_selection(select, checkpoints: list[tuple[int, Path]], cfg: dict, work: Path) -> dict:
    """Score ``checkpoints`` with ``select`` (on items the stage's ``datasets`` do not ask), put the
    chosen one into ``work``; the manifest record."""
    record = select(checkpoints, str(cfg.get("base_model")), work / "selection.jsonl", _train_files(cfg))
    chosen = dict(checkpoints)[record["chosen_step"]]
    last = max(step for step, _ in checkpoints)
    record["weights_from"] = chosen.name if record["chosen_step"] != last else "final"
    if record["chosen_step"] != last:  # the last checkpoint holds what the final save holds
        record["copied"] = apply_choice(chosen, work)
    return record


def checkpoint_line(sel: dict) -> str:
    """The kept checkpoint of a train manifest's ``extra.selection`` in one line, for the card and the verdict:
    ``step 5 of 10, the best of 2 on 20 dev items (pubmedqa-dev:20): accuracy 50.0% [29.9, 70.1]``."""
    best = next(c for c in sel["checkpoints"] if c["step"] == sel["chosen_step"])
    lo, hi = best["accuracy_ci95"]
    return (f"step {sel['chosen_step']} of {sel.get('last_step')}, the best of {len(sel['checkpoints'])} on "
            f"{sel['n']} dev items ({sel['by']}): accuracy {100 * best['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
