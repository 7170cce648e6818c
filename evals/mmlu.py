"""`tools eval mmlu-medical`: lm-eval's task machinery over the bundled MMLU CSVs (no Hub).

The nine subjects are local task files (``evals/lm_eval_tasks``, lm-eval's own MMLU prompt).
An HF model folder runs through lm-eval's ``hf`` model; a GGUF through ``medilora-gguf``, an
lm-eval model registered here and backed by our llama.cpp scorer (lm-eval's ``gguf`` backend
talks to a server and is broken / very slow against llama-cpp-python's).

results.json: task "mmlu-medical", shots, limit, n, accuracy (micro: over questions), accuracy_macro
(mean over subjects), valid_rate 1.0, subjects {name: {n, accuracy, stderr}}, model {path, name,
sha256, backend}, data {sha256 over the CSVs used}, lm_eval_version.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from tools.artifact import Artifact, Stage, is_artifact
from tools.errors import UserError
from tools.ggufpath import resolve_gguf
from tools.io import sha256_bytes, sha256_file, write_json
from tools.paths import bundled_data, embedded_gguf
from tools.progress import log

from .lm_eval_gguf import GGUF_MODEL_NAME, registered
from .render import render_mmlu_report

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "high_school_biology",
            "medical_genetics", "nutrition", "professional_medicine", "virology")


def task_manager(metadata: dict | None = None):
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def _model_info(model: Path) -> tuple[str, dict]:
    if model.is_dir():
        if not (model / "config.json").is_file():
            raise UserError("not an HF model folder (no config.json) and not a .gguf file", path=str(model),
                            field="--model")
        h = sha256_bytes("".join(f"{p.name}:{sha256_file(p)}" for p in sorted(model.glob("*.safetensors"))))
        return "hf", {"path": str(model.resolve()), "name": model.name, "sha256": h, "backend": "lm-eval hf"}
    resolve_gguf(model, "--model")
    return "gguf", {"path": str(model.resolve()), "name": model.name, "sha256": sha256_file(model),
                    "backend": f"lm-eval {GGUF_MODEL_NAME} (llama.cpp)"}


@dataclass(frozen=True)
class MmluSpec:
    """One MMLU-medical run: the model (None: the embedded GGUF), 0 or 5 shots, the subjects (None: all
    nine), the first ``limit`` questions of each, llama.cpp threads / GPU layers (GGUF), lm-eval's batch
    size (HF), the seed of lm-eval's samplers."""
    model: str | os.PathLike | None = None
    shots: int = 0
    subjects: tuple[str, ...] | None = None
    limit: int | None = None
    threads: int | None = None
    batch_size: int = 1
    n_gpu_layers: int | None = None
    seed: int = 0

    def checked(self) -> "MmluSpec":
        if self.shots not in (0, 5):
            raise UserError("must be 0 or 5", field="--shots")
        if self.limit is not None and self.limit < 1:
            raise UserError("must be at least 1", field="--limit")
        for s in self.subjects or ():
            if s not in SUBJECTS:
                raise UserError(f"unknown subject {s!r} (one of {', '.join(SUBJECTS)})", field="--subjects")
        return replace(self, subjects=tuple(self.subjects or SUBJECTS))


def _model_path(model) -> Path:
    p = Path(model) if model else embedded_gguf()
    if not p.exists():
        raise UserError("model not found", path=str(p), field="--model")
    if p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf")):
        p = resolve_gguf(p, "--model")  # a GGUF artifact folder (tools convert / quantize)
    return p


def _evaluate(spec: MmluSpec, kind: str, model_path: Path) -> tuple[dict, int | None]:
    """lm-eval's simple_evaluate on the local task files; returns its results and the GPU layers used."""
    if kind == "gguf":
        lm = registered()(pretrained=str(model_path), threads=spec.threads, seed=spec.seed,
                          n_gpu_layers=spec.n_gpu_layers)
        ngl = lm.runner.n_gpu_layers
    else:
        from lm_eval.models.huggingface import HFLM  # heavy: transformers

        lm, ngl = HFLM(pretrained=str(model_path), device="cpu", dtype="float32", batch_size=spec.batch_size), None
    try:
        res = simple_evaluate(model=lm, tasks=[f"mmlu_medical_{s}" for s in spec.subjects], num_fewshot=spec.shots,
                              limit=spec.limit, task_manager=task_manager(), log_samples=False,
                              random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
                              fewshot_random_seed=spec.seed, bootstrap_iters=0)
    finally:
        if kind == "gguf":
            lm.close()
    return res, ngl


def _results(spec: MmluSpec, res: dict, minfo: dict, csvs: list[Path], ngl) -> dict:
    """results.json from lm-eval's results: per subject, micro and macro accuracy."""
    subj = {}
    for s in spec.subjects:
        t = f"mmlu_medical_{s}"
        r, se = res["results"][t], res["results"][t].get("acc_stderr,none")
        subj[s] = {"n": int(res["n-samples"][t]["effective"]), "accuracy": round(float(r["acc,none"]), 6),
                   "stderr": round(float(se), 6) if isinstance(se, (int, float)) else None}
    n = sum(v["n"] for v in subj.values())
    return {"schema": 1, "task": "mmlu-medical", "shots": spec.shots, "limit": spec.limit, "n": n,
            "accuracy": round(sum(v["accuracy"] * v["n"] for v in subj.values()) / n, 6),
            "accuracy_macro": round(sum(v["accuracy"] for v in subj.values()) / len(subj), 6), "valid_rate": 1.0,
            "subjects": subj, "model": minfo, "seed": spec.seed, "n_gpu_layers": ngl,
            "data": {"sha256": sha256_bytes("".join(f"{p.name}:{sha256_file(p)}" for p in csvs))},
            "lm_eval_version": version("lm_eval")}


def run_mmlu(spec: MmluSpec, out: str | os.PathLike | None = None, *, force: bool = False,
             plots: bool = True) -> Artifact:
    """Artifact ``eval.mmlu-medical``: results.json, report.md and plots."""
    spec = spec.checked()
    model_path = _model_path(spec.model)
    kind, minfo = _model_info(model_path)
    csvs = [bundled_data() / "mmlu_medical" / sp / f"{s}_{sp}.csv" for s in spec.subjects for sp in ("test", "dev")]
    out = Path(out) if out else Path("runs") / "eval" / f"mmlu-medical-{model_path.stem}-{spec.shots}shot"
    params = {"shots": spec.shots, "subjects": list(spec.subjects), "limit": spec.limit, "seed": spec.seed,
              "backend": kind}
    inputs = ([model_path] if kind == "gguf" or is_artifact(model_path) else []) + csvs
    if kind == "hf" and not is_artifact(model_path):
        params["model_sha256"] = minfo["sha256"]
    with Stage("eval.mmlu-medical", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        t0 = time.perf_counter()
        res, ngl = _evaluate(spec, kind, model_path)
        wall = time.perf_counter() - t0
        results = _results(spec, res, minfo, csvs, ngl)
        write_json(st.path("results.json"), results)
        render_mmlu_report(results, st.path("report.md").parent, plots=plots)
        st.lineage.licenses.add("MIT")
        st.lineage.sources.add("MMLU (medical subjects)")
        st.extra.update({"accuracy": results["accuracy"], "n": results["n"],
                         "timing": {"wall_s": round(wall, 3), "s_per_item": round(wall / results["n"], 4)}})
    return st.result


def summary_lines(res: dict) -> list[str]:
    """Accuracy per subject, then the macro average."""
    lines = [f"{s:24s} {v['n']:5d}  {100 * v['accuracy']:5.1f}%" for s, v in res["subjects"].items()]
    return lines + [f"{'average (macro)':24s} {res['n']:5d}  {100 * res['accuracy_macro']:5.1f}%"]
