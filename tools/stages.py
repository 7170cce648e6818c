"""The one registry of stage names, the figures a pipeline shows of each, and what the ground floor
(`tools run` / `tools status`) needs to know about a verb without re-deciding what the verb owns.

A manifest's ``stage`` is ``FAMILY`` or ``FAMILY.KIND`` (``dataset.pubmedqa``, ``gguf.set``); readers name the
family (``read_artifact(p, stage=DATASET)``) and ``in_family`` matches it exactly on the dot, so no reader
spells a prefix ("dataset" vs "dataset.") of its own.
"""
from __future__ import annotations

from pathlib import Path

BASE_MODEL = "base-model"
HF_FROM_GGUF = "hf-from-gguf"
CORPUS = "corpus"
DATASET = "dataset"
DECONTAMINATE = "decontaminate"
STAGE = "stage"
TRAIN = "train"
MERGE = "merge"
GGUF = "gguf"
IMATRIX = "imatrix"
COMPARE_QUANT = "compare-quant"
CARD = "card"
EXPORT = "export"
BENCH = "bench"
EVAL = "eval"
REPORT = "report"
ANALYZE = "analyze"
SWEEP = "sweep"
PREDICT = "predict"
RAG = "rag"
AUDIT = "audit"  # `tools audit`: memorization evidence that `tools push` checks, never uploaded

# Kinds a reader asks for by name (a manifest's full ``FAMILY.KIND``), registered here like the families.
CORPUS_GENERAL = "corpus.general"  # general English shipped with Python: the replay half (corpora/general.py)
DATASET_PAIRS = "dataset.pairs"  # preference pairs from a bench run's mistakes (evals/pairs.py)
STAGE_DPO = "stage.dpo"  # Axolotl `rl:` preference stage (recipes/stage.py)
EVAL_GENERAL = "eval.general"  # perplexity on the held-out general English (evals/general.py)

FAMILIES = (BASE_MODEL, HF_FROM_GGUF, CORPUS, DATASET, DECONTAMINATE, STAGE, TRAIN, MERGE, GGUF, IMATRIX,
            COMPARE_QUANT, CARD, EXPORT, BENCH, EVAL, REPORT, ANALYZE, SWEEP, PREDICT, RAG, AUDIT)
DATA_FAMILIES = (CORPUS, DATASET)  # text artifacts: never pushed when derived from credentialed data

# The figures `tools status` shows of a finished step, by full kind or else by family (keys of
# manifest.extra, one level deep).
KEY_FIGURES: dict[str, tuple[str, ...]] = {
    CORPUS: ("kept", "documents"),  # extra.stats: MIMIC notes kept, textbook documents
    DATASET: ("items",),  # dataset.pairs: the pairs
    TRAIN: ("final_loss", "chosen_step"),  # chosen_step: extra.selection after `train --select-by`
    GGUF: ("file_type", "bits_per_weight"),
    COMPARE_QUANT: ("quant_type", "mean_kl"),
    BENCH: ("accuracy", "valid_rate"),
    EVAL: ("accuracy",),
    AUDIT: ("passed",),  # extra.audit.passed: the verdict `tools push` requires of a credentialed model
    EVAL_GENERAL: ("perplexity",),
}


def family(stage: str) -> str:
    """``dataset.pubmedqa`` -> ``dataset``."""
    return str(stage).split(".", 1)[0]


def in_family(stage: str, *families: str) -> bool:
    """Whether manifest stage ``stage`` is one of ``families`` (a family, or a full ``family.kind``)."""
    s = str(stage)
    return any(s == f or s.startswith(f.rstrip(".") + ".") for f in families)


def key_figures(stage: str) -> tuple[str, ...]:
    return KEY_FIGURES.get(str(stage), KEY_FIGURES.get(family(stage), ()))


# Verbs whose artifact does not go to RUN_DIR/STEP: (verb, where it goes given its positional argument).
# `train STAGE_DIR` writes STAGE_DIR/output (merge STAGE_DIR, stage --from and card read it there).
FIXED_OUT = {"train": lambda arg: Path(arg) / "output"}
# Verbs that resume a killed run; `tools VERB ARG --dry-run --json` says from where ("resume_from_step").
RESUMABLE = ("train",)
