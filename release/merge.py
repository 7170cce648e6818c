"""Merge a LoRA adapter into its base: Axolotl's ``merge-lora`` for a training stage folder (it
dequantizes a 4-bit base the right way), peft's ``merge_and_unload`` for a full-precision base.

The merged model is saved in the base's dtype (never silently in fp32), with the tokenizer the
adapter was trained with (else the base's) and its chat template.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from recipes.axolotl_cpu import AXOLOTL_ENV
from tools.artifact import Stage, is_artifact, read_artifact
from tools.errors import UserError, WorkError
from tools.progress import log
from tools.yamlio import read_yaml

from .convert import hf_chat_template

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def base_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype a checkpoint is stored in, from its config.json ("float32" when it does not say)."""
    cfg = Path(model_dir) / "config.json"
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("not an HF model folder (no config.json)", path=str(model_dir)) from None
    except json.JSONDecodeError as e:
        raise UserError(f"unreadable config.json ({e})", path=str(cfg)) from None
    dt = d.get("dtype") or d.get("torch_dtype") or (d.get("text_config") or {}).get("dtype") or "float32"
    return str(dt).replace("torch.", "")


def check_adapter(adapter: str | os.PathLike) -> Path:
    p = Path(adapter)
    if not p.exists():
        raise UserError("adapter folder not found", path=str(p), field="--adapter")
    if not p.is_dir():
        raise UserError("expected an adapter folder", path=str(p), field="--adapter")
    if not (p / "adapter_config.json").is_file():
        raise UserError("no adapter_config.json: not a LoRA adapter folder", path=str(p), field="--adapter")
    if not any((p / w).is_file() for w in ADAPTER_WEIGHTS):
        raise UserError("adapter_config.json without adapter weights (adapter_model.safetensors)", path=str(p),
                        field="--adapter")
    try:
        cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"unreadable adapter_config.json ({e})", path=str(p / "adapter_config.json")) from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise UserError("adapter_config.json has no peft_type", path=str(p / "adapter_config.json"), field="peft_type")
    return p


def _inputs(folder: Path) -> list[Path]:
    if is_artifact(folder):
        return [folder]
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file() and ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file())


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _finish(work: Path, base: Path, adapter: Path, want_dtype: str) -> dict:
    """Tokenizer (the adapter's when it saved one), dtype check, chat template check."""
    # the base's tokenizer files first (e.g. the sentencepiece tokenizer.model that transformers 5 no
    # longer writes back), then what the adapter was trained with on top (added tokens, chat template)
    tok_src = adapter if _has_tokenizer(adapter) else base
    if base != work:
        _copy_tokenizer(base, work)
    if tok_src is adapter:
        _copy_tokenizer(adapter, work)
    got = base_dtype(work)
    if got != want_dtype:
        _resave(work, want_dtype)
        got = base_dtype(work)
        if got != want_dtype:
            raise WorkError(f"merged model saved as {got}, base is {want_dtype}")
    template = hf_chat_template(work)
    return {"dtype": got, "tokenizer_from": "adapter" if tok_src is adapter else "base",
            "chat_template": bool(template)}


def _resave(work: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    log(f"re-saving the merged model in the base's dtype ({dtype})")
    m = AutoModelForCausalLM.from_pretrained(work, dtype=getattr(torch, dtype))
    for f in list(work.glob("*.safetensors")) + list(work.glob("*.safetensors.index.json")):
        f.unlink()
    m.save_pretrained(work, safe_serialization=True)


def merge_peft(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
               force: bool = False, dry_run: bool = False):
    """peft ``merge_and_unload`` for a full-precision base -> artifact ``out`` (stage ``merge``)."""
    base, adapter = Path(base), check_adapter(adapter)
    if not base.is_dir() or not (base / "config.json").is_file():
        raise UserError("base model folder not found or has no config.json", path=str(base), field="--base")
    dtype = base_dtype(base)
    params = {"method": "peft.merge_and_unload", "dtype": dtype}
    if dry_run:
        return {"method": "peft", "base": str(base), "adapter": str(adapter), "dtype": dtype, "out": str(out)}
    with Stage("merge", out, params, inputs=_inputs(base) + _inputs(adapter), force=force, log=log) as st:
        if st.skipped:
            return st.result
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        log(f"merging {adapter} into {base} ({dtype}) with peft")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
        tok_src = adapter if _has_tokenizer(adapter) else base
        try:
            from transformers import AutoTokenizer
            vocab = len(AutoTokenizer.from_pretrained(tok_src))
            if vocab > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(vocab)
        except (OSError, ValueError):
            pass
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(st.work, safe_serialization=True)
        st.extra.update(_finish(st.work, base, adapter, dtype))
        st.extra.update({"base_model": str(base), "adapter": str(adapter), "method": "peft"})
    return st.result


def merge_stage_dir(stage_dir: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                    dry_run: bool = False):
    """``axolotl merge-lora STAGE_DIR/axolotl.yaml --lora-model-dir STAGE_DIR/output`` -> artifact ``out``."""

    stage_dir = Path(stage_dir)
    cfg_file = stage_dir / "axolotl.yaml"
    if not cfg_file.is_file():
        raise UserError("no axolotl.yaml: not a training stage folder", path=str(stage_dir))
    cfg = read_yaml(cfg_file, what="stage config", default={})
    if not cfg.get("base_model"):
        raise UserError("no base_model", path=str(cfg_file), field="base_model")
    output = stage_dir / "output"
    art = read_artifact(output, stage="train")  # refuses an unfinished training run
    adapter = check_adapter(art.path)
    base_name = str(cfg["base_model"])
    base_path = Path(base_name)
    if base_path.is_dir():
        dtype = base_dtype(base_path)
    else:  # a Hub id: its config must be in the local cache (no network)
        try:
            from huggingface_hub import hf_hub_download
            dtype = base_dtype(Path(hf_hub_download(base_name, "config.json")).parent)
        except Exception:  # noqa: BLE001
            raise UserError("base_model is neither a local folder nor in the local HF cache", path=str(cfg_file),
                            field="base_model") from None
    params = {"method": "axolotl merge-lora", "dtype": dtype, "base_model": base_name}
    if dry_run:
        cmd = [str(Path(sys.executable).parent / "axolotl"), "merge-lora", str(cfg_file), "--lora-model-dir",
               str(adapter), "--output-dir", "<temporary folder>"]
        return {"method": "axolotl", "command": cmd, "base_model": base_name, "dtype": dtype, "out": str(out)}
    with Stage("merge", out, params, inputs=[output, cfg_file], force=force, log=log) as st:
        if st.skipped:
            return st.result

        env = dict(os.environ)
        env.update(AXOLOTL_ENV)
        bindir = Path(sys.executable).parent
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        with tempfile.TemporaryDirectory(prefix=".axolotl-merge-", dir=st.work.parent) as tmp:
            cmd = [str(bindir / "axolotl"), "merge-lora", str(cfg_file), "--lora-model-dir", str(adapter),
                   "--output-dir", tmp]
            log("running: " + " ".join(cmd))
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            merged = Path(tmp) / "merged"
            if r.returncode != 0 or not (merged / "config.json").is_file():
                tail = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
                raise WorkError(f"axolotl merge-lora failed (exit {r.returncode}): {tail[0][:300]}")
            for f in sorted(merged.iterdir()):
                if f.is_file():
                    shutil.move(str(f), st.work / f.name)
        st.extra.update(_finish(st.work, base_path if base_path.is_dir() else st.work, adapter, dtype))
        st.extra.update({"base_model": art.extra.get("base_model", base_name), "adapter": str(adapter),
                         "method": "axolotl"})
    return st.result


def merge(stage_dir: str | os.PathLike | None = None, *, base: str | os.PathLike | None = None,
          adapter: str | os.PathLike | None = None, out: str | os.PathLike | None = None, force: bool = False,
          dry_run: bool = False):
    """`tools merge`: a stage folder through Axolotl (OUT defaults to STAGE_DIR/merged), or --base/--adapter
    through peft. Returns the ``merge`` artifact, or with ``dry_run`` the plan (a dict)."""
    if stage_dir is not None and (base or adapter):
        raise UserError("give either STAGE_DIR or --base/--adapter, not both", field="STAGE_DIR")
    if stage_dir is not None:
        return merge_stage_dir(stage_dir, out or Path(stage_dir) / "merged", force=force, dry_run=dry_run)
    if not base or not adapter or not out:
        raise UserError("without STAGE_DIR, --base, --adapter and --out are all needed", field="--base")
    return merge_peft(base, adapter, out, force=force, dry_run=dry_run)
