"""The model card, written from the artifacts' manifests and the eval results with huggingface_hub's
ModelCard / ModelCardData (``model-index`` carries the eval results)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from tools.artifact import Artifact, Lineage, Stage, read_artifact
from tools.errors import UserError
from tools.progress import log

ACK_CREDENTIALED = "credentialed-training"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_STAGES = ("train", "merge", "gguf")
CARD_INPUT_STAGES = MODEL_STAGES + ("bench.", "compare-quant")

DUA_NOTE = ("Data derived from credentialed sources (MIMIC and the like) is covered by a data use agreement: "
            "it may be shared only with credentialed users under that agreement (for MIMIC, through "
            "PhysioNet's credentialed access), never on a public hub.")


def classify(paths) -> dict[str, list[Artifact]]:
    groups: dict[str, list[Artifact]] = {"train": [], "merge": [], "gguf": [], "bench": [], "compare-quant": []}
    for p in paths:
        art = read_artifact(p)
        st = art.stage
        if st.startswith("bench."):
            groups["bench"].append(art)
        elif st in groups:
            groups[st].append(art)
        else:
            raise UserError(f"a model card is made from train, merge, gguf, bench.* and compare-quant artifacts, "
                            f"not {st!r}", path=str(p))
    return groups


def _num(d: dict, key: str, path: Path, *, required: bool = True, lo: float | None = None, hi: float | None = None):
    v = d.get(key)
    if v is None:
        if required:
            raise UserError(f"missing {key}", path=str(path), field=key)
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{key} must be a number, got {v!r}", path=str(path), field=key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise UserError(f"{key} out of range: {v}", path=str(path), field=key)
    return v


def read_bench(art: Artifact) -> dict:
    """A bench artifact's results.json, checked field by field."""
    f = art.path / "results.json"
    if not f.is_file():
        raise UserError("bench artifact has no results.json", path=str(art.path))
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable JSON ({e})", path=str(f)) from None
    if not isinstance(d, dict):
        raise UserError("expected a JSON object", path=str(f))
    task = d.get("task") or art.stage.split(".", 1)[-1]
    if not isinstance(task, str):
        raise UserError("task must be a string", path=str(f), field="task")
    acc = _num(d, "accuracy", f, lo=0, hi=1)
    valid = _num(d, "valid_rate", f, required=False, lo=0, hi=1)
    n = _num(d, "n", f, lo=1)
    return {"task": task, "accuracy": float(acc), "valid_rate": None if valid is None else float(valid),
            "n": int(n), "mode": d.get("mode") if isinstance(d.get("mode"), str) else None,
            "model": d.get("model") if isinstance(d.get("model"), str) else None}


def read_compare(art: Artifact) -> dict:
    f = art.path / "results.json"
    if not f.is_file():
        raise UserError("compare-quant artifact has no results.json", path=str(art.path))
    d = json.loads(f.read_text(encoding="utf-8"))
    for k in ("mean_kl", "perplexity_ratio"):
        _num(d, k, f)
    return d


def _hub_id(s: str | None) -> str | None:
    if s and HUB_ID.match(s) and not Path(s).exists():
        return s
    return None


def build_card(paths, out: str | os.PathLike, *, repo_id: str | None = None, license: str | None = None,
               base_model: str | None = None, datasets: tuple[str, ...] = (), acknowledge_credentialed: bool = False,
               force: bool = False):
    """Write artifact ``out`` (stage ``card``) holding README.md."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("give at least one artifact (train, merge or gguf)", field="ARTIFACTS")
    groups = classify(paths)
    if not any(groups[s] for s in MODEL_STAGES):
        raise UserError("no model artifact (train, merge or gguf) among the inputs", field="ARTIFACTS")
    if repo_id is not None and not HUB_ID.match(repo_id):
        raise UserError(f"not a Hub repo id (ORG/NAME): {repo_id!r}", field="--repo-id")
    benches = [(a, read_bench(a)) for a in groups["bench"]]
    compares = [(a, read_compare(a)) for a in groups["compare-quant"]]
    lin = Lineage()
    for p in paths:
        lin.merge(read_artifact(p).lineage)
    if lin.credentialed and not acknowledge_credentialed:
        log("note: these artifacts derive from credentialed data; the card says they must not be shared "
            "(--acknowledge-credentialed-training records an explicit acknowledgement)")

    bases = [a.extra.get("base_model") for a in groups["train"] + groups["merge"] if a.extra.get("base_model")]
    base = base_model or next((b for b in bases if _hub_id(str(b))), None) or (bases[0] if bases else None)
    base_id = _hub_id(str(base)) if base else None
    has_adapter = bool(groups["train"])
    ggufs = groups["gguf"]
    if has_adapter and not groups["merge"] and not ggufs:
        relation, library = "adapter", "peft"
    elif has_adapter or groups["merge"]:
        relation, library = "finetune", ("peft" if has_adapter else "transformers")
    else:
        relation, library = "quantized", "gguf"
    if not groups["merge"] and not has_adapter and ggufs:
        library = "gguf"
    lic = license or (sorted(lin.licenses)[0].lower() if len(lin.licenses) == 1 else ("other" if lin.licenses else None))
    qtypes = sorted({a.extra.get("file_type") for a in ggufs if a.extra.get("file_type")})
    tags = sorted({"medical", "medilora", *(["gguf"] if ggufs else []), *(["lora"] if has_adapter else []),
                   *(q.lower() for q in qtypes), *(["credentialed-data"] if lin.credentialed else [])})
    name = repo_id.split("/", 1)[1] if repo_id else (ggufs[0].extra.get("file", "model").rsplit(".", 1)[0] if ggufs else "medilora-model")

    evals = []
    for _, b in sorted(benches, key=lambda x: x[1]["task"]):
        evals.append(EvalResult(task_type="question-answering", dataset_type=f"medilora/{b['task']}",
                                dataset_name=b["task"], metric_type="accuracy", metric_value=round(b["accuracy"], 4),
                                metric_name="accuracy"))
        if b["valid_rate"] is not None:
            evals.append(EvalResult(task_type="question-answering", dataset_type=f"medilora/{b['task']}",
                                    dataset_name=b["task"], metric_type="valid_rate",
                                    metric_value=round(b["valid_rate"], 4), metric_name="valid-response rate"))
    for _, c in compares:
        ds = f"quantization gap ({c.get('text', 'text')})"
        evals.append(EvalResult(task_type="text-generation", dataset_type="medilora/quantization-gap", dataset_name=ds,
                                metric_type="perplexity", metric_value=c["quant"]["perplexity"],
                                metric_name=f"perplexity {c['quant']['file_type']}"))
        evals.append(EvalResult(task_type="text-generation", dataset_type="medilora/quantization-gap", dataset_name=ds,
                                metric_type="kl_divergence", metric_value=c["mean_kl"],
                                metric_name=f"mean KL {c['quant']['file_type']} vs {c['ref']['file_type']}"))
    data = ModelCardData(
        base_model=base_id, base_model_relation=relation if base_id else None, library_name=library,
        license=lic, datasets=sorted(datasets) or None, tags=tags, language=["en"], pipeline_tag="text-generation",
        model_name=name, eval_results=evals or None,
    )
    body = _body(name, base, relation, groups, benches, compares, lin, acknowledge_credentialed, lic)
    content = f"---\n{data.to_yaml()}\n---\n\n{body}"
    params = {"repo_id": repo_id, "license": license, "base_model": base_model, "datasets": sorted(datasets),
              "acknowledge_credentialed": acknowledge_credentialed}
    with Stage("card", out, params, inputs=paths, force=force, log=log) as st:
        if st.skipped:
            return st.result
        card = ModelCard(content)
        card.save(st.path("README.md"))
        if lin.credentialed and acknowledge_credentialed:
            st.lineage.acknowledgements.add(ACK_CREDENTIALED)
        st.extra.update({"repo_id": repo_id, "base_model": base, "base_model_relation": relation,
                         "library_name": library, "license": lic, "eval_results": len(evals),
                         "push_allowed": (not lin.credentialed) or acknowledge_credentialed})
    return st.result


def _pct(x):
    return f"{100 * x:.1f}%"


def _body(name, base, relation, groups, benches, compares, lin: Lineage, ack: bool, lic) -> str:
    L = [f"# {name}", ""]
    what = {"adapter": "a LoRA adapter for", "finetune": "a fine-tune of", "quantized": "a quantized"}[relation]
    L.append(f"{name} is {what} `{base or 'an unnamed base model'}`, built with the MediLoRA toolchain "
             "(Axolotl for training, llama.cpp for GGUF conversion and quantization).")
    L.append("")
    L.append("## Files")
    L.append("")
    if groups["train"]:
        L.append("- LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`): load with peft on the base model.")
    if groups["merge"]:
        L.append("- Merged model (safetensors, tokenizer and chat template).")
    for a in groups["gguf"]:
        e = a.extra
        line = f"- `{e.get('file')}`: {e.get('file_type')}"
        if e.get("bits_per_weight"):
            line += f", {e['bits_per_weight']:.2f} bits per weight"
        if e.get("tensor_types"):
            mix = sorted(e["tensor_types"].items(), key=lambda kv: -kv[1]["elements"])
            line += " (tensor types: " + ", ".join(f"{k} x{v['tensors']}" for k, v in mix) + ")"
        if e.get("requested_type") and e.get("mostly_applied") is False:
            line += (f". Note: only {_pct(e.get('primary_type_share', 0))} of the weights are {e.get('primary_type')}; "
                     "llama.cpp fell back to other types for rows that are not a multiple of its block size")
        L.append(line)
    L += ["", "The chat template (ChatML) is stored inside every GGUF.", ""]
    if benches:
        L += ["## Evaluation", "", "| task | accuracy | valid-response rate | items |", "|---|---|---|---|"]
        for _, b in sorted(benches, key=lambda x: x[1]["task"]):
            vr = _pct(b["valid_rate"]) if b["valid_rate"] is not None else "n/a"
            L.append(f"| {b['task']} | {_pct(b['accuracy'])} | {vr} | {b['n']} |")
        L.append("")
    if compares:
        L += ["## Quantization gap", "",
              "| reference | quantized | ppl (ref) | ppl (quant) | ppl change | mean KL | top-1 agreement | tokens |",
              "|---|---|---|---|---|---|---|---|"]
        for _, c in compares:
            L.append(f"| {c['ref']['file_type']} | {c['quant']['file_type']} | {c['ref']['perplexity']:.3f} | "
                     f"{c['quant']['perplexity']:.3f} | {c['perplexity_delta_pct']:+.2f}% | {c['mean_kl']:.5f} | "
                     f"{_pct(c['top1_agreement'])} | {c['tokens_scored']} |")
        L.append("")
    L += ["## Data lineage and license", ""]
    L.append(f"- License: {lic or 'not stated'}" + (f" (sources: {', '.join(sorted(lin.licenses))})" if lin.licenses else ""))
    if lin.sources:
        L.append(f"- Sources: {', '.join(sorted(lin.sources))}")
    L.append(f"- Credentialed data: {'yes' if lin.credentialed else 'no'}")
    if lin.credentialed:
        if ack:
            L.append("- This model was trained on credentialed data (e.g. MIMIC) under a data use agreement. Its "
                     "release was explicitly acknowledged by the publisher, who is responsible for the agreement "
                     "allowing it. No credentialed data itself is included in this repository.")
        else:
            L.append(f"- Not for sharing: {DUA_NOTE}")
    L += ["", "## Intended use", "",
          "Research on medical question answering. Not a medical device; not for clinical decisions.", ""]
    return "\n".join(L)
