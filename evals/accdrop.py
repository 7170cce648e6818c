"""`tools quantize F16 --budget acc-drop=N`: the accuracy points a quantized GGUF loses against its f16 on
dev items, paired item by item and judged with its 95 % interval.

The items (``--budget-data``, the grammar of `tools train --select-by`: ``pubmedqa-dev[:N]`` [default:
all 500 PubMedQA dev items], ``medqa-dev[:N]`` or any MCQ ``FILE.jsonl[:N]`` in `tools bench mcq`'s form)
are scored by `tools bench --mode loglik` itself (evals.bench: the same prompts, chat template and
argmax of the options' summed log-likelihood), once on the f16 and once on each candidate. Test items are
refused as everywhere (evals.select.refuse_test_items): a ``-test`` split, or a file holding any PubMedQA
test PMID or MedQA test question, exits 2 before anything runs.

The rule. On the same n items, with ``lost`` the items the f16 gets right and the candidate wrong and
``gained`` the reverse, the drop is ``(lost - gained) / n`` (f16 accuracy minus the candidate's) and its
95 % interval is the Wald interval of a paired difference (evals.stats.paired_diff_ci, the interval the
"ship or not" verdict uses). A candidate meets ``acc-drop=N`` when the **upper end** of that interval,
in accuracy points, is at most N. A candidate that answers every item as the f16 does has the interval
[0, 0] and meets any N >= 0; one that changes answers must show, with its interval, that it loses no
more than N points, so more items make a budget easier to meet for a candidate that loses little.

Layers: release cannot import evals, so evals.cli registers :func:`accuracy_probe` with release.budget
when the CLI starts (Python callers call ``release.budget.register_accuracy(accuracy_probe)`` themselves).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tools.io import sha256_file

from .bench import BenchSpec, plan_bench, run_items
from .select import SelectBy, parse_select_by
from .stats import paired_diff_ci, wilson

DEFAULT_DATA = "pubmedqa-dev"
FIELD = "--budget-data"


def loglik_correct(model: Path, sel: SelectBy, scratch: Path, threads: int | None = None,
                   n_ctx: int = 4096) -> dict[str, bool]:
    """Item id -> right or wrong of ``model`` on ``sel``'s items, by `tools bench --mode loglik`'s scorer."""
    custom = sel.split == "custom"
    spec = BenchSpec(task="mcq" if custom else sel.flavor, model=model, data=sel.data if custom else None,
                     split="dev", limit=sel.limit, mode="loglik", threads=threads, n_ctx=n_ctx, plots=False)
    scratch.unlink(missing_ok=True)  # never resume another model's rows
    rows, _ = run_items(plan_bench(spec), scratch)
    scratch.unlink(missing_ok=True)
    return {r["id"]: bool(r["correct"]) for r in rows}


def paired_drop(ref: dict[str, bool], cand: dict[str, bool]) -> dict:
    """The figures of a candidate against the f16 on the same items: its accuracy (Wilson interval), the
    items lost and gained, and the drop ``100 * (lost - gained) / n`` points with its paired 95 % interval."""
    if set(ref) != set(cand):
        raise ValueError("the f16 and the candidate were scored on different items")
    n = len(ref)
    lost = sum(ref[i] and not cand[i] for i in ref)
    gained = sum(cand[i] and not ref[i] for i in ref)
    k = sum(cand.values())
    lo, hi = paired_diff_ci(gained, lost, n)  # accuracy(f16) - accuracy(candidate)
    return {"items": n, "accuracy": round(k / n, 6), "accuracy_ci95": wilson(k, n),
            "ref_accuracy": round(sum(ref.values()) / n, 6), "lost": lost, "gained": gained,
            "acc_drop_points": round(100 * (lost - gained) / n, 4),
            "acc_drop_ci95_points": [round(100 * lo, 4), round(100 * hi, 4)]}


@dataclass
class AccuracyProbe:
    """Dev items checked (test items refused) when built; :meth:`reference` scores the f16 once,
    :meth:`score` a candidate against it (:func:`paired_drop`'s figures)."""
    sel: SelectBy
    threads: int | None = None
    n_ctx: int = 4096
    ref: dict[str, bool] | None = field(default=None, repr=False)

    @property
    def inputs(self) -> list[Path]:
        return [self.sel.data]

    def params(self) -> dict:
        return {"data": self.sel.spec, "split": self.sel.split, "items": self.sel.limit,
                "sha256": sha256_file(self.sel.data), "scorer": "bench loglik", "n_ctx": self.n_ctx}

    def describe(self) -> str:
        return f"{self.sel.spec} ({len(self.ref) if self.ref else '?'} items, bench loglik)"

    def reference(self, f16: Path, work: Path) -> dict:
        self.ref = loglik_correct(f16, self.sel, work / "accuracy-f16.jsonl", self.threads, self.n_ctx)
        k = sum(self.ref.values())
        return {"items": len(self.ref), "accuracy": round(k / len(self.ref), 6),
                "accuracy_ci95": wilson(k, len(self.ref))}

    def score(self, gguf: Path, work: Path) -> dict:
        if self.ref is None:
            raise RuntimeError("score the f16 first (AccuracyProbe.reference)")
        return paired_drop(self.ref, loglik_correct(gguf, self.sel, work / "accuracy-candidate.jsonl",
                                                    self.threads, self.n_ctx))


def accuracy_probe(spec: str | None = None, threads: int | None = None) -> AccuracyProbe:
    """The probe of ``--budget-data SPEC`` [pubmedqa-dev]: parsed and its items loaded now, so a test item
    or an unreadable file stops the command before anything is quantized (UserError, exit 2)."""
    sel = parse_select_by(spec or DEFAULT_DATA, field=FIELD)
    sel.load()
    return AccuracyProbe(sel, threads)
