"""`tools build-dataset pairs --bench RUN`: preference pairs from a bench run's own mistakes.

For every item the run got wrong (or, in generate mode, could not parse): the prompt is the bench's
(system prompt and user message of evals.items, as the model was asked), ``chosen`` the gold answer
in the protocol's answer format (PubMedQA: ``label. LONG_ANSWER`` when the data has the long answer,
as the SFT sets write it; MedQA: ``(A) text``), ``rejected`` the model's own answer (generate: its
raw text; loglik: the option it scored highest). Rows ``{id, system, prompt, chosen, rejected,
meta}`` go to ``train.jsonl`` of a ``dataset.pairs`` artifact whose inputs (the bench run, its data)
carry the lineage; `tools stage dpo --pairs` trains on it (Axolotl ``chatml.prompt_pairs``).

Only dev or train items can become pairs: a run on the test split is refused, and so is a run on a
custom file that holds any benchmark test item (evals.select.refuse_test_items), exit 2.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from corpora.sft import pubmedqa_assistant
from tools.artifact import Artifact, Stage, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl, write_jsonl
from tools.progress import log
from tools.stages import BENCH, DATASET_PAIRS

from .bench import _long_answers
from .items import Item, answer_text, load_items, system_prompt, user_message
from .mcq import load_mcq
from .select import refuse_test_items


def _bench_items(res: dict, where: Path) -> tuple[dict[str, Item], str, Path]:
    """(items by id, flavour, data file) of a bench run, test items refused."""
    if res.get("split") == "test":
        raise UserError("a bench run on the test split cannot become training pairs (bench --split dev, or a "
                        "dev/train file)", path=str(where), field="split")
    data = Path(res["data"]["path"])
    if res["task"] == "mcq":
        items, _, flavor = load_mcq(data, res.get("map"))
    else:
        flavor = res["task"]
        items = load_items(flavor, data)[0]
    refuse_test_items(items, flavor, data)
    return {it.id: it for it in items}, flavor, data


def _chosen(flavor: str, it: Item, long_answers: dict[str, str]) -> str:
    if flavor == "pubmedqa" and long_answers.get(it.id):
        return pubmedqa_assistant(it.answer, long_answers[it.id])
    return answer_text(flavor, it.answer, it)


def pair_rows(bench_dir: Path) -> tuple[list[dict], dict]:
    """The pairs of a bench run, and counts (items, right, pairs, skipped)."""
    res_f = bench_dir / "results.json"
    res = json.loads(res_f.read_text(encoding="utf-8"))
    by_id, flavor, data = _bench_items(res, res_f)
    long_answers = _long_answers(data) if flavor == "pubmedqa" else {}
    rows, counts = [], Counter()
    for r in read_jsonl(bench_dir / "items.jsonl", required=("id", "gold", "correct")):
        counts["items"] += 1
        it = by_id.get(str(r["id"]))
        if it is None:
            raise UserError(f"item {r['id']!r} is not in the run's data file {data}", path=str(bench_dir / "items.jsonl"),
                            field="id")
        if r["correct"]:
            counts["right"] += 1
            continue
        rejected = (r.get("raw") or "").strip() if res["mode"] == "generate" else answer_text(flavor, r["pred"], it)
        chosen = _chosen(flavor, it, long_answers)
        if not rejected or rejected == chosen:
            counts["skipped"] += 1
            continue
        rows.append({"id": it.id, "system": system_prompt(flavor, it.options), "prompt": user_message(flavor, it),
                     "chosen": chosen, "rejected": rejected,
                     "meta": {"task": flavor, "gold": it.answer, "labels": list(it.options),
                              "model_answer": r.get("parsed", r.get("pred")), "bench_mode": res["mode"]}})
    counts["pairs"] = len(rows)
    return rows, dict(counts)


def build_pairs(bench_dir: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Artifact:
    """Write the ``dataset.pairs`` artifact of a bench run (UserError on a test run or no mistakes)."""
    bench = read_artifact(bench_dir, stage=BENCH)
    res = json.loads((bench.path / "results.json").read_text(encoding="utf-8"))
    rows, counts = pair_rows(bench.path)  # refuses test items before anything is written
    if not rows:
        raise UserError(f"the run has no wrong answer to learn from ({counts})", path=str(bench.path))
    with Stage(DATASET_PAIRS, out, {"bench": str(bench.path.resolve()), "format": "prompt_pairs"},
               inputs=[bench.path, Path(res["data"]["path"])], force=force, log=log) as st:
        if st.skipped:
            return st.result
        write_jsonl(st.path("train.jsonl"), rows)
        st.lineage.sources.add(f"bench {res['task']} ({res.get('split')}) of {res['model']['name']}")
        st.extra.update({"items": len(rows), "counts": counts, "task": res["task"], "bench_mode": res["mode"],
                         "model": res["model"]})
    log(f"pairs: {len(rows)} from {counts['items']} items ({counts.get('right', 0)} right) -> {out}")
    return st.result
