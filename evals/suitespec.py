"""The options every suite run shares (`tools eval suite open-medical` and `... meditron`).

One dataclass, so the two protocols' specs cannot drift apart on the common flags; each protocol's spec
adds its own fields (evals/suite.py: SuiteSpec, evals/suite_meditron.py: MeditronSpec)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SuiteRunSpec:
    """Model, data files, answer base, limit and runtime options of one suite run."""

    model: str | os.PathLike | None = None
    data: dict[str, str] = field(default_factory=dict)   # task -> file (--data TASK=FILE; MMLU: a folder)
    answer_base: int | None = None                       # MedMCQA cop: 0 or 1 (default: told from the file)
    limit: int | None = None                             # first N questions of each task (MMLU: of each subject)
    threads: int | None = None
    n_ctx: int = 4096
    n_gpu_layers: int | None = None
    out: str | os.PathLike | None = None
    force: bool = False
    plots: bool = True
