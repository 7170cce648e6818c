"""HF -> GGUF with llama.cpp's own converter, matched to the llama.cpp that llama-cpp-python bundles.

``convert_hf_to_gguf.py`` is not an importable package. We use ``$LLAMA_CPP_DIR`` when set, else
the llama-cpp-python source distribution of the *installed* version, which ``make install`` keeps
(see ``release.llamasrc``). No llama.cpp code lives in this repository.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tools.artifact import Stage, is_artifact
from tools.errors import UserError, WorkError
from tools.ggufpath import default_threads
from tools.progress import log

from .card import trace_base_model
from .fit import memory_figures
from .ggufinfo import gguf_filename, read_gguf
from .llamasrc import llama_cpp_version, run_script
from .quantgap import _load, _window_logprobs, heldout_text, next_token_gap

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
# the fidelity gate: largest mean KL(HF float32 || GGUF) per output type, smallest top-1 agreement
FIDELITY_MAX_KL = {"f32": 0.002, "f16": 0.01, "bf16": 0.03, "q8_0": 0.03}
FIDELITY_MIN_TOP1 = 0.9


@dataclass(frozen=True)
class Gate:
    """The fidelity gate: ``tokens`` held-out tokens scored (0 skips it), the largest mean KL(HF || GGUF)
    (None: :data:`FIDELITY_MAX_KL` of the output type) and the smallest top-1 agreement."""
    tokens: int = 256
    max_kl: float | None = None
    min_top1: float = FIDELITY_MIN_TOP1


def convert_hf_to_gguf(model_dir: str | os.PathLike, outfile: str | os.PathLike, outtype: str = "f16",
                       model_name: str | None = None, metadata: dict | None = None) -> Path:
    """Run llama.cpp's converter on an HF model folder; the GGUF appears at ``outfile`` only on success."""
    model_dir = Path(model_dir)
    if outtype not in OUTTYPES:
        raise UserError(f"unknown outtype {outtype!r} (one of {', '.join(OUTTYPES)})", field="--outtype")
    if not (model_dir / "config.json").is_file():
        raise UserError("not an HF model folder (no config.json)", path=str(model_dir))
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.parent / f".{outfile.name}.partial"
    args = [str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    if model_name:
        args += ["--model-name", model_name]
    meta_file = None
    if metadata:
        meta_file = outfile.parent / f".{outfile.name}.metadata.json"
        meta_file.write_text(json.dumps(metadata), encoding="utf-8")
        args += ["--metadata", str(meta_file)]
    try:
        r = run_script("convert_hf_to_gguf.py", args)
    finally:
        if meta_file is not None:
            meta_file.unlink(missing_ok=True)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise WorkError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir}: {tail[0]}")
    os.replace(tmp, outfile)
    return outfile


# -- the `tools convert` stage -----------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def hf_chat_template(model_dir: str | os.PathLike) -> str | None:
    """The chat template an HF tokenizer folder carries (chat_template.jinja or tokenizer_config.json)."""
    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cj = d / "chat_template.json"
    if cj.is_file():
        try:
            t = json.loads(cj.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise UserError("unreadable chat_template.json", path=str(cj)) from None
        if isinstance(t, str):
            return t
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as e:
            raise UserError(f"unreadable tokenizer_config.json ({e})", path=str(tc)) from None
        if isinstance(t, str):
            return t
        if isinstance(t, list):  # named templates: the default one
            for item in t:
                if isinstance(item, dict) and item.get("name") == "default":
                    return item.get("template")
    return None


def _model_inputs(model_dir: Path) -> list[Path]:
    """What a convert depends on: the artifact folder itself, or the files of a plain HF folder."""
    if is_artifact(model_dir):
        return [model_dir]
    return sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def name_metadata(name: str | None) -> dict:
    """general.name / general.basename overrides: what the model is, never a folder name."""
    if not name:
        return {}
    base = "-".join("".join(c if c.isalnum() or c == "." else " " for c in name).split())
    if not base:
        raise UserError(f"not a usable model name: {name!r}", field="--name")
    return {"general.name": name, "general.basename": base, "general.finetune": None}


def default_name(model_dir: Path) -> str | None:
    """'MediLoRA <base model name>' when the lineage leads to a Hub model, else None."""
    hub = trace_base_model([model_dir])
    return f"MediLoRA {hub.split('/', 1)[1]}" if hub else None


def convert_stage(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", *,
                  force: bool = False, name: str | None = None, gate: Gate = Gate(), threads: int | None = None):
    """HF folder -> artifact ``out`` (stage ``gguf``) holding ``<BaseName>-<Size>-<FineTune>-<TYPE>.gguf``.

    The GGUF must carry the HF tokenizer's chat template, byte for byte, and pass the fidelity gate
    (see :func:`fidelity_check`; ``Gate(tokens=0)`` skips it). The artifact records the memory the GGUF needs
    at several context sizes (``extra.memory``, release.fit).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError("model folder not found", path=str(model_dir))
    if outtype not in OUTTYPES or outtype == "auto":
        raise UserError(f"unknown outtype {outtype!r} (one of f16, bf16, f32, q8_0)", field="--outtype")
    if not (model_dir / "config.json").is_file():
        raise UserError("not an HF model folder (no config.json)", path=str(model_dir))
    template = hf_chat_template(model_dir)
    if not template:
        raise UserError("the model's tokenizer has no chat template (every MediLoRA GGUF carries one); "
                        "add it to tokenizer_config.json or chat_template.jinja", path=str(model_dir))
    name = name or default_name(model_dir)
    meta = name_metadata(name)
    fidelity_tokens, min_top1 = gate.tokens, gate.min_top1
    max_kl = FIDELITY_MAX_KL[outtype] if gate.max_kl is None else gate.max_kl
    params = {"outtype": outtype, "converter": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {llama_cpp_version()})",
              "name": name, "fidelity": {"tokens": fidelity_tokens, "max_kl": max_kl, "min_top1": min_top1}}
    with Stage("gguf", out, params, inputs=_model_inputs(model_dir), force=force, log=log) as st:
        if st.skipped:
            return st.result
        log(f"converting {model_dir} to GGUF ({outtype}) with llama.cpp's converter")
        tmp = convert_hf_to_gguf(model_dir, st.path("model.gguf"), outtype, metadata=meta)
        info = read_gguf(tmp)
        name_ = gguf_filename(info["metadata"], outtype)
        os.replace(tmp, st.path(name_))
        if info["chat_template"] != template:
            raise WorkError("the GGUF's chat template differs from the tokenizer's "
                            f"({len(info['chat_template'] or '')} vs {len(template)} characters)")
        st.extra.update({"file": name_, "architecture": info["architecture"], "file_type": info["file_type"],
                         "parameters": info["parameters"], "bits_per_weight": info["bits_per_weight"],
                         "tensor_types": info["tensor_types"], "chat_template_sha256": _sha(template),
                         "source": "convert", "name": info["name"], "memory": memory_figures(info)})
        if fidelity_tokens:
            fid = fidelity_check(model_dir, st.path(name_), max_tokens=fidelity_tokens, threads=threads)
            fid.update({"threshold_kl": max_kl, "threshold_top1": min_top1})
            st.extra["fidelity"] = fid
            bad = gate_failures(fid, max_kl, min_top1)
            if bad:
                raise WorkError("fidelity gate: the GGUF does not behave like the HF model on "
                                f"{fid['tokens_scored']} held-out tokens: " + "; ".join(bad.values())
                                + " (wrong tokenizer, template or rope setting?)")
    return st.result


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the fidelity gate ---------------------------------------------------------------------------

def fidelity_check(model_dir: str | os.PathLike, gguf: str | os.PathLike, *, max_tokens: int = 256,
                   text: str | None = None, threads: int | None = None) -> dict:
    """Next-token distributions of the HF model (transformers, float32) and the GGUF (llama.cpp) on the
    same held-out tokens: mean KL(HF || GGUF), top-1 agreement, and whether both tokenize alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    given = text is not None
    text = text if given else heldout_text(2)[: 12 * max_tokens]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    threads = default_threads(threads)
    llm = _load(Path(gguf), max_tokens + 1, threads)
    try:
        g_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        bos = llm.token_bos() if bool(llm._model.add_bos_token()) and llm.token_bos() >= 0 else None
        n = min(len(hf_ids), len(g_ids), max_tokens - (1 if bos is not None else 0))
        mism = next((i for i in range(n) if hf_ids[i] != g_ids[i]), None)
        ids = ([bos] if bos is not None else []) + hf_ids[:n]
        lg = _window_logprobs(llm, ids)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lh = torch.log_softmax(logits, dim=-1).numpy()
    return {**fidelity_figures(hf=lh, gguf=lg), "tokens_match": mism is None and len(hf_ids[:n]) == len(g_ids[:n]),
            "first_token_mismatch": mism, "text": "given" if given else "pubmedqa-test-heldout"}


def fidelity_figures(*, hf, gguf) -> dict:
    """Mean and largest KL(HF || GGUF) (the HF model's distribution is the reference p) and top-1 agreement
    of the next-token log-probabilities ``hf`` and ``gguf``: one row per position of the same token ids;
    the last position predicts no token of the text and is not scored."""
    v = min(hf.shape[1], gguf.shape[1])  # padded vocabularies: compare the common part
    kl, same = next_token_gap(hf[:-1, :v], gguf[:-1, :v])
    return {"tokens_scored": int(len(kl)), "mean_kl": float(f"{kl.mean():.6g}"), "max_kl": float(f"{kl.max():.6g}"),
            "top1_agreement": round(float(same.mean()), 6)}


def gate_failures(fid: dict, max_kl: float, min_top1: float) -> dict[str, str]:
    """The checks of the fidelity gate that the figures ``fid`` fail, each with its line: ``tokens_match``
    (the GGUF tokenizes the text differently), ``mean_kl`` (above ``max_kl``), ``top1_agreement`` (below
    ``min_top1``). Empty: the gate passes."""
    bad = {}
    if not fid["tokens_match"]:
        bad["tokens_match"] = (f"the GGUF tokenizes the text differently from the HF tokenizer (first difference "
                               f"at token {fid['first_token_mismatch']})")
    if fid["mean_kl"] > max_kl:
        bad["mean_kl"] = f"mean KL(HF || GGUF) {fid['mean_kl']:.4g} nats > {max_kl:g}"
    if fid["top1_agreement"] < min_top1:
        bad["top1_agreement"] = f"top-1 agreement {100 * fid['top1_agreement']:.1f}% < {100 * min_top1:.0f}%"
    return bad


# -- a LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py) ---------------------------------

def convert_lora_stage(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, out: str | os.PathLike,
                       outtype: str = "f16", *, name: str | None = None, force: bool = False):
    """PEFT adapter folder (a ``train`` artifact or plain) -> artifact ``out`` (stage ``gguf.lora``)
    holding ``<name>-LoRA-<TYPE>.gguf``; ``base_dir`` is the HF base it was trained on (its config)."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError("not a LoRA adapter folder (no adapter_config.json)", path=str(adapter_dir))
    if not any((adapter_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError("the adapter folder has no adapter_model.safetensors", path=str(adapter_dir))
    if not (base_dir / "config.json").is_file():
        raise UserError("--base is not an HF model folder (no config.json)", path=str(base_dir), field="--base")
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise UserError(f"unknown outtype {outtype!r} (one of f16, bf16, f32, q8_0)", field="--outtype")
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable adapter_config.json ({e})", path=str(adapter_dir / "adapter_config.json")) from None
    name = name or default_name(adapter_dir) or "MediLoRA adapter"
    params = {"outtype": outtype, "name": name, "lora": True,
              "converter": f"llama.cpp convert_lora_to_gguf.py (llama-cpp-python {llama_cpp_version()})"}
    inputs = _model_inputs(adapter_dir) + _model_inputs(base_dir)
    with Stage("gguf.lora", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        tmp = st.path(".lora.partial.gguf")
        log(f"converting the LoRA adapter {adapter_dir} to GGUF ({outtype}) with llama.cpp's converter")
        r = run_script("convert_lora_to_gguf.py", ["--base", str(base_dir), "--outfile", str(tmp),
                                                   "--outtype", outtype, str(adapter_dir)])
        if r.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
            raise WorkError(f"llama.cpp's convert_lora_to_gguf.py failed on {adapter_dir}: {tail[0]}")
        info = read_gguf(tmp)
        base = name_metadata(name)["general.basename"]
        fname = f"{base}-LoRA-{outtype.upper()}.gguf"
        os.replace(tmp, st.path(fname))
        st.extra.update({"file": fname, "architecture": info["architecture"], "file_type": info["file_type"],
                         "parameters": info["parameters"], "tensor_types": info["tensor_types"],
                         "lora_alpha": info["metadata"].get("adapter.lora.alpha"), "r": cfg.get("r"),
                         "target_modules": cfg.get("target_modules"), "source": "convert-lora", "name": name})
    return st.result


def convert_model(model_dir: str | os.PathLike, outtype: str = "f16", out: str | os.PathLike | None = None, *,
                  name: str | None = None, lora: bool = False, base: str | os.PathLike | None = None,
                  gate: Gate = Gate(), force: bool = False):
    """`tools convert`: an HF model folder -> ``gguf`` artifact (with the fidelity gate), or with ``lora`` an
    adapter -> ``gguf.lora`` artifact (needs ``base``). OUT defaults to MODEL_DIR-OUTTYPE beside it."""
    model_dir = Path(model_dir)
    if lora:
        if base is None:
            raise UserError("--lora needs --base (the HF base model folder)", field="--base")
        out = out or model_dir.parent / f"{model_dir.name}-lora-{outtype}"
        return convert_lora_stage(model_dir, base, out, outtype, name=name, force=force)
    if base is not None:
        raise UserError("--base goes with --lora", field="--base")
    if gate.tokens < 0:
        raise UserError("must be 0 or more", field="--fidelity-tokens")
    return convert_stage(model_dir, out or model_dir.parent / f"{model_dir.name}-{outtype}", outtype, force=force,
                         name=name, gate=gate)


def summary_lines(art) -> list[str]:
    """What `tools convert` prints: the GGUF, its type, size and bits; the fidelity gate's figures."""
    f = art.path / art.extra["file"]
    line = f"{f}  {art.extra['file_type']}  {f.stat().st_size / 2**20:.1f} MiB"
    if "bits_per_weight" in art.extra:
        line += f"  {art.extra['bits_per_weight']:.2f} bits/weight"
    fid = art.extra.get("fidelity")
    return [line] + ([f"fidelity vs HF (float32): mean KL {fid['mean_kl']:.2e} nats, top-1 agreement "
                      f"{100 * fid['top1_agreement']:.1f}% on {fid['tokens_scored']} held-out tokens"] if fid else [])
