"""Training memory footprint: trainable / frozen parameter MB and activation MB, measured.

Activation memory is measured, not estimated: during one forward pass of a real batch we count
the bytes of every tensor autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``; storages counted once by data pointer). Parameter
memory is the bytes of the parameters as they are stored (4-bit weights count as packed bytes).
Compared regimes (LoRAG's Table 2): full fine-tuning, LoRA on a full-precision base, QLoRA on a
4-bit (NF4, bitsandbytes) base.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.errors import UserError
from tools.yamlio import read_yaml

MB = 1024 * 1024


@dataclass
class Footprint:
    regime: str
    trainable_mb: float
    frozen_mb: float
    total_param_mb: float
    activation_mb: float
    trainable_params: int
    total_params: int
    batch: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def _param_bytes(p) -> int:
    return p.numel() * p.element_size()


def _logical_numel(p) -> int:
    """Parameters a weight stands for (a packed 4-bit tensor holds two a byte)."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        n = 1
        for d in qs.shape:
            n *= int(d)
        return n
    return p.numel()


def _activation_bytes(model, batch: int, seq_len: int, vocab: int) -> int:
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - tensor subclasses without a storage
            ptr, size = id(t), t.numel() * t.element_size()
        if not isinstance(t, torch.nn.Parameter) and not getattr(t, "_is_param", False):
            seen.setdefault(ptr, size)
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)  # seq2seq: targets as long as the source
    total = sum(sz for ptr, sz in seen.items() if ptr not in params)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def measure(model_dir: str | Path, regime: str, *, batch: int = 2, seq_len: int = 128, lora_r: int = 8,
            lora_alpha: int = 16, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Footprint:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = bool(getattr(AutoConfig.from_pretrained(model_dir), "is_encoder_decoder", False))
    Auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    kw: dict = {"dtype": torch.float32}
    if regime == "qlora":
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32,
                                                       bnb_4bit_use_double_quant=True)
        kw["device_map"] = "cpu"
    model = Auto.from_pretrained(model_dir, **kw)
    if regime in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        if regime == "qlora":
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(targets),
                                                 task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"))
    elif regime != "full":
        raise ValueError(regime)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    tb = sum(_param_bytes(p) for p in trainable)
    fb = sum(_param_bytes(p) for p in frozen)
    vocab = model.config.vocab_size
    act = _activation_bytes(model, batch, seq_len, vocab)
    n_train = sum(p.numel() for p in trainable)
    n_total = n_train + sum(_logical_numel(p) for p in frozen)
    return Footprint(regime, tb / MB, fb / MB, (tb + fb) / MB, act / MB, n_train, n_total, batch, seq_len)


def stage_model(stage_dir: str | Path | None, model: str | None, lora_r: int | None) -> tuple[str, int, tuple[str, ...]]:
    """(base model folder, LoRA rank, target modules) of a stage folder (Axolotl or seq2seq) or ``--model``."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    r = lora_r
    if stage_dir:
        sd = Path(stage_dir)
        if (sd / "seq2seq.json").is_file():  # the T5 LoRA path (recipes.seq2seq)
            cfg = json.loads((sd / "seq2seq.json").read_text())
            model = model or cfg.get("base_model")
            r = r or cfg.get("lora_r")
            targets = tuple(cfg.get("target_modules") or ("q", "k", "v", "o"))
        elif (sd / "axolotl.yaml").is_file():
            cfg = read_yaml(sd / "axolotl.yaml")
            model = model or cfg.get("base_model")
            r = r or cfg.get("lora_r")
            targets = tuple(cfg.get("lora_target_modules") or targets)
        else:
            raise UserError("stage folder has no axolotl.yaml or seq2seq.json", path=str(stage_dir))
    if not model:
        raise UserError("give a STAGE_DIR or --model", field="--model")
    if not (Path(model) / "config.json").is_file():
        raise UserError("not a local HF model folder (no config.json)", path=str(model))
    return str(model), int(r or 8), targets


def measure_stage(stage_dir: str | Path | None, model: str | None, *, regimes=("full", "lora", "qlora"),
                  batch: int = 2, seq_len: int = 256, lora_r: int | None = None) -> list[dict]:
    """`tools memory`: one measured row per regime."""
    model, r, targets = stage_model(stage_dir, model, lora_r)
    return [measure(model, reg, batch=batch, seq_len=seq_len, lora_r=r, targets=targets).to_dict() for reg in regimes]


def memory_table(rows: list[dict], title: str):
    """The rich Table `tools memory` prints: one row a regime."""
    from rich.table import Table

    t = Table(title=title)
    for c in ("regime", "trainable MB", "frozen MB", "total param MB", "activation MB", "trainable params"):
        t.add_column(c)
    for x in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in
                    (x["regime"], x["trainable_mb"], x["frozen_mb"], x["total_param_mb"], x["activation_mb"],
                     x["trainable_params"])])
    return t
