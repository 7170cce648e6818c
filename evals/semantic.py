"""Semantic answer metrics, as LoRAG judged its answers: BERTScore F1, SemScore, NLI entailment.

* BERTScore F1: the ``bert-score`` package over a local model (raw F1, no baseline rescaling).
* SemScore: cosine similarity of the sentence embeddings of prediction and reference
  (sentence-transformers).
* NLI entailment: probability of the *entailment* label for premise = reference, hypothesis =
  prediction, from a local sequence-classification (MNLI) model; the label is found by name in the
  model's ``id2label``.

Models are paths (or Hub ids already in the local cache). The defaults follow LoRAG and the papers
behind the metrics (``LORAG_MODELS``); where one is not available offline, BERTScore and SemScore
fall back to the packaged all-MiniLM-L6-v2 and say so, and NLI is skipped with the reason. Every
result names the model used (and its content hash) or why a metric was skipped.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from evals.rag import embed, load_sentence_model, model_fingerprint, resolve_model_dir
from recipes.seq2seq import predict
from tools.artifact import Artifact, Stage, is_artifact, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl, require_file, write_json, write_jsonl
from tools.paths import embedded_embedder
from tools.plotting import pyplot, save_png
from tools.progress import log, progress

STAGE = "eval.semantic"
METRICS = ("bertscore_f1", "semscore", "nli_entailment")
# LoRAG's / the metric papers' models: bert-score's English default, SemScore's embedder, an MNLI judge.
LORAG_MODELS = {"bertscore_f1": "roberta-large", "semscore": "sentence-transformers/all-mpnet-base-v2",
                "nli_entailment": "roberta-large-mnli"}
PRED_FIELDS = ("prediction", "pred", "raw_output", "output", "response", "generated", "completion")
REF_FIELDS = ("reference", "ref", "long_answer", "reference_answer", "answer_text", "target", "gold_text")
ID_FIELDS = ("id", "item_id")
DISABLED = ("none", "off", "skip")


# -- inputs ----------------------------------------------------------------------------------------

def _pick(row: dict, fields: tuple[str, ...]) -> str | None:
    for f in fields:
        if f in row:
            return f
    return None


def _read_texts(path: Path, fields: tuple[str, ...], what: str) -> tuple[list[tuple[str, str, int]], bool]:
    """(id, text, line) rows from a JSONL (id + one of ``fields``) or a text file (one per line)."""
    if path.suffix in (".jsonl", ".json") or str(path).endswith(".jsonl.gz"):
        rows = []
        for lineno, row in enumerate(read_jsonl(path), 1):
            idf, tf = _pick(row, ID_FIELDS), _pick(row, fields)
            if idf is None:
                raise UserError("missing field 'id'", path=str(path), line=lineno, field="id")
            if tf is None:
                raise UserError(f"no {what} field (one of: {', '.join(fields)})", path=str(path), line=lineno, field=fields[0])
            if not isinstance(row[tf], str):
                raise UserError(f"{what} must be a string", path=str(path), line=lineno, field=tf)
            rows.append((str(row[idf]), row[tf], lineno))
        return rows, True
    require_file(path, f"{what} file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (byte 0x{e.object[e.start]:02x})", path=str(path)) from None
    return [(str(i), line, i) for i, line in enumerate(lines, 1)], False


def load_pairs(results: str | os.PathLike | None = None, pred: str | os.PathLike | None = None,
               ref: str | os.PathLike | None = None) -> list[dict]:
    """[{id, prediction, reference}] from a results folder (items.jsonl) or --pred/--ref files.

    JSONL inputs are joined on id (every prediction needs a reference); plain text files are joined
    line by line (same number of lines). A JSONL that holds both fields needs no --ref.
    """
    if results is not None and pred is not None:
        raise UserError("give a results folder or --pred, not both", field="--pred")
    if results is not None:
        rdir = Path(results)
        if not rdir.is_dir():
            raise UserError("results folder not found", path=str(rdir))
        pred_file = rdir / "items.jsonl"
        if not pred_file.is_file():
            raise UserError("results folder has no items.jsonl", path=str(rdir))
    elif pred is not None:
        pred_file = Path(pred)
    else:
        raise UserError("give a RESULTS_DIR or --pred FILE (with --ref FILE)", field="--pred")
    if ref is None:
        rows = []
        for lineno, row in enumerate(read_jsonl(pred_file), 1):
            pf, rf, idf = _pick(row, PRED_FIELDS), _pick(row, REF_FIELDS), _pick(row, ID_FIELDS)
            if pf is None:
                raise UserError(f"no prediction field (one of: {', '.join(PRED_FIELDS)})", path=str(pred_file),
                                line=lineno, field="prediction")
            if rf is None:
                raise UserError(f"no reference field (one of: {', '.join(REF_FIELDS)}); pass --ref FILE",
                                path=str(pred_file), line=lineno, field="reference")
            if not isinstance(row[pf], str) or not isinstance(row[rf], str):
                raise UserError("prediction and reference must be strings", path=str(pred_file), line=lineno, field=pf)
            rows.append({"id": str(row[idf]) if idf else str(lineno), "prediction": row[pf], "reference": row[rf]})
        if not rows:
            raise UserError("no items", path=str(pred_file))
        _check_unique([(r["id"], 0) for r in rows], pred_file)
        return rows
    ref_file = Path(ref)
    preds, p_json = _read_texts(pred_file, PRED_FIELDS, "prediction")
    refs, r_json = _read_texts(ref_file, REF_FIELDS, "reference")
    if p_json != r_json:
        raise UserError("--pred and --ref must both be JSONL (joined on id) or both text files (joined by line)",
                        path=str(ref_file))
    if not p_json:
        if len(preds) != len(refs):
            raise UserError(f"{len(preds)} predictions but {len(refs)} references (text files are joined line by line)",
                            path=str(ref_file))
        return [{"id": i, "prediction": p, "reference": r} for (i, p, _), (_, r, _) in zip(preds, refs)]
    _check_unique([(i, ln) for i, _, ln in preds], pred_file)
    _check_unique([(i, ln) for i, _, ln in refs], ref_file)
    by_id = {i: t for i, t, _ in refs}
    out = []
    for i, p, ln in preds:
        if i not in by_id:
            raise UserError(f"id {i!r} has no reference in {ref_file}", path=str(pred_file), line=ln, field="id")
        out.append({"id": i, "prediction": p, "reference": by_id[i]})
    if not out:
        raise UserError("no predictions", path=str(pred_file))
    return out


def _check_unique(ids: list[tuple[str, int]], path: Path) -> None:
    seen: dict[str, int] = {}
    for i, ln in ids:
        if i in seen:
            raise UserError(f"duplicate id {i!r}", path=str(path), line=ln or None, field="id")
        seen[i] = ln


# -- models ----------------------------------------------------------------------------------------

def resolve_metric_model(metric: str, spec: str | None) -> tuple[Path | None, str, str | None]:
    """(model folder or None, display name, note). None folder = skipped (note says why)."""
    flag = {"bertscore_f1": "--bertscore-model", "semscore": "--semscore-model", "nli_entailment": "--nli-model"}[metric]
    if spec is not None and str(spec).lower() in DISABLED:
        return None, "", f"disabled ({flag} {spec})"
    if spec is not None:
        return resolve_model_dir(spec, what=f"{metric} model", field=flag), str(spec), None
    default = LORAG_MODELS[metric]
    try:
        return resolve_model_dir(default, what=f"{metric} model", field=flag, local_only=True), default, None
    except UserError:
        pass
    if metric == "nli_entailment":
        return None, "", (f"LoRAG's NLI model {default} is not available offline and no MNLI classifier is packaged; "
                          f"pass {flag} PATH")
    return (embedded_embedder(), "all-MiniLM-L6-v2 (packaged)",
            f"LoRAG's {default} is not available offline; used the packaged all-MiniLM-L6-v2 instead "
            f"(scores are not comparable with published {metric} figures)")


def bertscore_f1(preds: list[str], refs: list[str], model_dir: Path, *, num_layers: int | None = None,
                 batch_size: int = 16, name: str | None = None) -> tuple[list[float], dict]:
    from bert_score import BERTScorer
    from bert_score.utils import model2layers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    cfg = AutoConfig.from_pretrained(str(model_dir))
    total = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    layers = num_layers or model2layers.get(name or "", None) or total
    if total and not 1 <= layers <= total:
        raise UserError(f"model has {total} layers, asked for layer {layers}", field="--bertscore-layer")
    scorer = BERTScorer(model_type=str(model_dir), num_layers=layers, batch_size=batch_size, device="cpu",
                        use_fast_tokenizer=True)
    _, _, f1 = scorer.score(list(preds), list(refs), verbose=False, batch_size=batch_size)
    return [float(x) for x in f1.tolist()], {"layer": layers, "rescaled": False}


def semscore(preds: list[str], refs: list[str], model_dir: Path, *, batch_size: int = 32) -> tuple[list[float], dict]:
    model = load_sentence_model(model_dir, what="SemScore model")
    a = embed(model, list(preds), batch_size=batch_size)
    b = embed(model, list(refs), batch_size=batch_size)
    return [float(x) for x in (a * b).sum(axis=1).tolist()], {"pooling": "sentence-transformers, unit-normalised"}


def entailment_index(id2label: dict, model_dir: Path) -> int:
    found = [int(i) for i, lab in (id2label or {}).items() if "entail" in str(lab).lower()
             and "not" not in str(lab).lower() and "non" not in str(lab).lower()]
    if len(found) != 1:
        raise UserError(f"the NLI model's id2label has no single entailment label ({id2label})",
                        path=str(Path(model_dir) / "config.json"), field="id2label")
    return found[0]


def nli_entailment(preds: list[str], refs: list[str], model_dir: Path, *, batch_size: int = 16) -> tuple[list[float], dict]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    ent = entailment_index(model.config.id2label, model_dir)
    max_len = min(512, int(getattr(tok, "model_max_length", 512) or 512))
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(preds), batch_size):
            enc = tok(list(refs[i:i + batch_size]), list(preds[i:i + batch_size]), truncation=True,
                      max_length=max_len, padding=True, return_tensors="pt")
            probs = torch.softmax(model(**enc).logits.float(), dim=-1)
            out.extend(float(x) for x in probs[:, ent].tolist())
    return out, {"premise": "reference", "hypothesis": "prediction", "label": model.config.id2label[ent]}


# -- the evaluation --------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 6) if xs else float("nan")


def score_pairs(pairs: list[dict], *, bertscore_model: str | None = None, semscore_model: str | None = None,
                nli_model: str | None = None, bertscore_layer: int | None = None, batch_size: int = 16) -> dict:
    """Per-item scores and means: {"items": [...], "metrics": {name: {...}}, "skipped": {name: reason}}."""
    preds = [p["prediction"] for p in pairs]
    refs = [p["reference"] for p in pairs]
    specs = {"bertscore_f1": bertscore_model, "semscore": semscore_model, "nli_entailment": nli_model}
    metrics: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    per_item: dict[str, list[float]] = {}
    with progress("semantic metrics", total=len(METRICS), unit="metrics") as advance:
        for m in METRICS:
            model_dir, name, note = resolve_metric_model(m, specs[m])
            if model_dir is None:
                skipped[m] = note
                log(f"{m}: skipped: {note}")
                advance()
                continue
            log(f"{m}: {name} ({model_dir})" + (f"; note: {note}" if note else ""))
            if m == "bertscore_f1":
                vals, info = bertscore_f1(preds, refs, model_dir, num_layers=bertscore_layer, batch_size=batch_size,
                                          name=name)
            elif m == "semscore":
                vals, info = semscore(preds, refs, model_dir, batch_size=batch_size)
            else:
                vals, info = nli_entailment(preds, refs, model_dir, batch_size=batch_size)
            vals = [round(v, 6) for v in vals]
            per_item[m] = vals
            metrics[m] = {"mean": _mean(vals), "model": name, "model_path": str(model_dir),
                          "model_sha256": model_fingerprint(model_dir), **info, **({"note": note} if note else {})}
            advance()
    items = []
    for j, p in enumerate(pairs):
        items.append({**p, **{m: (per_item[m][j] if m in per_item else None) for m in METRICS}})
    return {"n": len(pairs), "metrics": metrics, "skipped": skipped, "items": items}


def _plot(items: list[dict], metrics: dict, out_png: Path) -> None:
    plt = pyplot()

    names = [m for m in METRICS if m in metrics] or ["(none)"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, m in zip(axes[0], names):
        vals = [it[m] for it in items if it.get(m) is not None and not math.isnan(it[m])] if m in metrics else []
        if vals:
            ax.hist(vals, bins=min(20, max(5, len(vals))), range=(min(0.0, min(vals)), 1.0), color="#2e86c1",
                    edgecolor="white")
            ax.axvline(metrics[m]["mean"], color="#c0392b", linestyle="--", label=f"mean {metrics[m]['mean']:.3f}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "skipped", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{m}\n{metrics.get(m, {}).get('model', '')}", fontsize=9)
        ax.set_xlabel("score")
        ax.set_ylabel("items")
    fig.tight_layout()
    save_png(fig, out_png)


def _report(res: dict, source: str) -> str:
    lines = [f"# Semantic metrics ({res['n']} items)", "", f"Source: `{source}`", "",
             "| metric | mean | model | note |", "|---|---|---|---|"]
    for m in METRICS:
        if m in res["metrics"]:
            r = res["metrics"][m]
            extra = f"layer {r['layer']}" if m == "bertscore_f1" else ""
            note = "; ".join(x for x in (extra, r.get("note", "")) if x)
            lines.append(f"| {m} | {r['mean']:.4f} | `{r['model']}` | {note} |")
        else:
            lines.append(f"| {m} | skipped | | {res['skipped'][m]} |")
    lines += ["", "BERTScore F1 is raw (no baseline rescaling). NLI: premise = reference, hypothesis = prediction, "
              "probability of the entailment label.", "", "![distributions](semantic.png)", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class MetricModels:
    """The models that score (a local folder, a Hub id in the cache, or "none" to skip a metric) and how."""

    bertscore_model: str | None = None
    semscore_model: str | None = None
    nli_model: str | None = None
    bertscore_layer: int | None = None
    batch_size: int = 16


def evaluate(out: str | os.PathLike, *, results: str | os.PathLike | None = None, pred: str | os.PathLike | None = None,
             ref: str | os.PathLike | None = None, limit: int | None = None, force: bool = False,
             **models) -> Artifact:
    """Score predictions against references into an ``eval.semantic`` artifact at ``out``; ``models`` are
    MetricModels fields (or ``models=MetricModels(...)``)."""
    mm = models.pop("models", None) or MetricModels(**models)
    bertscore_model, semscore_model, nli_model = mm.bertscore_model, mm.semscore_model, mm.nli_model
    bertscore_layer, batch_size = mm.bertscore_layer, mm.batch_size
    pairs = load_pairs(results, pred, ref)
    if limit is not None:
        if limit < 1:
            raise UserError(f"must be >= 1, got {limit}", field="--limit")
        pairs = pairs[:limit]
    inputs: list = []
    if results is not None:
        inputs.append(results if is_artifact(results) else Path(results) / "items.jsonl")
    else:
        inputs.append(pred)
    if ref is not None:
        inputs.append(ref)
    params = {"bertscore_model": bertscore_model, "semscore_model": semscore_model, "nli_model": nli_model,
              "bertscore_layer": bertscore_layer, "limit": limit}
    with Stage(STAGE, out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        res = score_pairs(pairs, bertscore_model=bertscore_model, semscore_model=semscore_model, nli_model=nli_model,
                          bertscore_layer=bertscore_layer, batch_size=batch_size)
        write_jsonl(st.path("items.jsonl"), res["items"])
        summary = {k: v for k, v in res.items() if k != "items"}
        write_json(st.path("results.json"), summary)
        _plot(res["items"], res["metrics"], st.path("semantic.png"))
        st.path("report.md").write_text(_report(res, str(results or pred)), encoding="utf-8")
        st.extra.update({"n": res["n"], "means": {m: r["mean"] for m, r in res["metrics"].items()},
                         "models": {m: r["model"] for m, r in res["metrics"].items()}, "skipped": res["skipped"]})
    return st.result


def read_results(art: Artifact) -> dict:
    return json.loads(art.file("results.json").read_text(encoding="utf-8"))


__all__ = ["evaluate", "score_pairs", "load_pairs", "bertscore_f1", "semscore", "nli_entailment", "LORAG_MODELS",
           "METRICS", "read_results", "read_artifact"]


def run_semantic(results_dir: str | os.PathLike | None = None, *, pred: str | os.PathLike | None = None,
                 ref: str | os.PathLike | None = None, out: str | os.PathLike | None = None, force: bool = False,
                 limit: int | None = None, **options) -> Artifact:
    """`tools eval semantic`: score a bench's results (RESULTS_DIR), a --pred/--ref pair, or the answers a
    seq2seq `train` output (``seq2seq_dir``) generates on ``data`` first (``split``, ``max_new_tokens``; written
    beside OUT as OUT-predictions). The other ``options`` are MetricModels fields."""
    seq2seq_dir, data = options.pop("seq2seq_dir", None), options.pop("data", None)
    split, max_new_tokens = options.pop("split", "test"), options.pop("max_new_tokens", 128)
    if seq2seq_dir is not None:
        if results_dir is not None or pred is not None:
            raise UserError("--seq2seq generates the predictions: give no RESULTS_DIR or --pred with it", field="--seq2seq")
        if data is None:
            raise UserError("--seq2seq needs --data DATASET_DIR (the questions and reference answers)", field="--data")

        base = Path(out) if out else Path(seq2seq_dir).parent / f"{Path(data).name}-{split}"
        results_dir = str(predict(seq2seq_dir, data, base.parent / f"{base.name}-predictions", split=split,
                                  max_new_tokens=max_new_tokens, limit=limit, force=force).path)
    if results_dir is None and pred is None:
        raise UserError("give a RESULTS_DIR or --pred FILE (with --ref FILE)", field="RESULTS_DIR")
    src = Path(results_dir or pred)
    if out is None:
        out = src.parent / f"{src.name.split('.')[0]}-semantic"
    return evaluate(out, results=results_dir, pred=pred, ref=ref, limit=limit, force=force, **options)


def summary_lines(res: dict) -> list[str]:
    """One line per metric: its mean and model, or why it was skipped."""
    lines = []
    for m in METRICS:
        if m in res["metrics"]:
            r = res["metrics"][m]
            lines.append(f"  {m:<15} {r['mean']:.4f}  ({r['model']}" + (f"; {r['note']}" if r.get("note") else "") + ")")
        else:
            lines.append(f"  {m:<15} skipped: {res['skipped'][m]}")
    return lines
