"""The seq2seq (T5) LoRA path, as LoRAG trained it: Axolotl trains causal LMs only, so this path
runs transformers' ``Seq2SeqTrainer`` with a peft LoRA on the attention projections q, k, v, o
(option ``ffn``: also the feed-forward wi_0, wi_1, wo; wi, wo on non-gated T5).

Same contract as the Axolotl path: ``write_stage`` writes a ``stage.sft`` artifact (manifest extra
``{"arch": "seq2seq"}``) holding ``seq2seq.json`` (the resolved training config) and ``launch.sh``;
``train`` writes ``STAGE_DIR/output`` as a ``train`` artifact (adapter files, ``log_history.json``,
extra ``base_model``, ``adapter``, ``log_history``, ``final_loss``).

Prompt: ``#### Question:{question}\\n#### Answer:`` (the user turn of each ChatML example; the
assistant turn is the target). Sources are cut at ``max_source_length`` tokens (at most 512).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tools.artifact import Artifact, Stage, is_artifact, read_artifact
from tools.errors import UserError, WorkError
from tools.io import canonical_json, read_jsonl, sha256_bytes, sha256_file, write_json, write_jsonl
from tools.progress import log, progress

PROMPT = "#### Question:{question}\n#### Answer:"
CONFIG_FILE = "seq2seq.json"
T5_FAMILY = ("t5", "mt5", "umt5", "longt5")
ATTENTION_TARGETS = ["q", "k", "v", "o"]
MAX_SOURCE = 512
DEFAULTS = {
    "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "ffn": False,
    "learning_rate": 3e-4, "num_epochs": 1, "max_steps": -1, "micro_batch_size": 4,
    "gradient_accumulation_steps": 1, "warmup_steps": 0, "weight_decay": 0.0,
    "max_source_length": MAX_SOURCE, "max_target_length": 128, "seed": 42, "logging_steps": 1,
}
_TYPES = {"lora_r": int, "lora_alpha": (int, float), "lora_dropout": (int, float), "ffn": bool,
          "learning_rate": (int, float), "num_epochs": (int, float), "max_steps": int, "micro_batch_size": int,
          "gradient_accumulation_steps": int, "warmup_steps": int, "weight_decay": (int, float),
          "max_source_length": int, "max_target_length": int, "seed": int, "logging_steps": int}
ALIASES = {"lr": "learning_rate", "epochs": "num_epochs", "batch_size": "micro_batch_size",
           "sequence_len": "max_source_length", "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
           "lora_mlp": "ffn"}
# Axolotl-path keys that mean nothing here (recorded as ignored, not an error).
IGNORED = {"preset", "gpus", "nodes", "launcher", "sample_packing", "flash_attention", "gradient_checkpointing",
           "chat_template", "val_set_size", "from_stage", "base_stage", "deepspeed", "fsdp", "optimizer",
           "lr_scheduler", "output_dir", "arch", "stage", "adapter", "system_prompt"}


def _fingerprint(model_dir: Path) -> str:
    items = [(f.relative_to(model_dir).as_posix(), sha256_file(f)) for f in sorted(model_dir.rglob("*"))
             if f.is_file() and f.name != "README.md" and not any(p.startswith(".") for p in f.relative_to(model_dir).parts)]
    return sha256_bytes(canonical_json(items))


def _resolve_base(base_model: str | os.PathLike) -> Path:
    p = Path(base_model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError("base model folder has no config.json", path=str(p))
        return p.resolve()
    if p.exists():
        raise UserError("base model must be a model folder, got a file", path=str(p))
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(base_model), local_files_only=bool(os.environ.get("HF_HUB_OFFLINE"))))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"base model not found: not a folder and not available from the Hugging Face cache "
                        f"({type(e).__name__})", path=str(base_model)) from None


def _check_params(params: dict) -> tuple[dict, dict]:
    cfg = dict(DEFAULTS)
    ignored = {}
    for key, val in (params or {}).items():
        k = ALIASES.get(key, key)
        if val is None:
            continue
        if k in ("load_in_4bit", "load_in_8bit") and val:
            raise UserError("the seq2seq path trains LoRA on a full-precision base; QLoRA (4/8-bit) is not "
                            "supported here", field=key)
        if key == "adapter" and str(val).lower() not in ("lora", ""):
            raise UserError(f"the seq2seq path trains LoRA adapters only, got {val!r}", field=key)
        if k in IGNORED or k in ("load_in_4bit", "load_in_8bit"):
            ignored[key] = val
            continue
        if k not in DEFAULTS:
            raise UserError(f"unknown seq2seq parameter (known: {', '.join(sorted(DEFAULTS))})", field=key)
        t = _TYPES[k]
        if isinstance(val, bool) and t is not bool:
            raise UserError(f"expected a number, got {val!r}", field=key)
        if not isinstance(val, t):
            raise UserError(f"expected {getattr(t, '__name__', 'a number')}, got {val!r}", field=key)
        cfg[k] = val
    if key_sl := ("sequence_len" if "sequence_len" in (params or {}) else None):
        if cfg["max_source_length"] > MAX_SOURCE:
            log(f"note: {key_sl}={cfg['max_source_length']} is cut to the seq2seq source limit {MAX_SOURCE}")
            cfg["max_source_length"] = MAX_SOURCE
    if not 1 <= cfg["max_source_length"] <= MAX_SOURCE:
        raise UserError(f"must be between 1 and {MAX_SOURCE}, got {cfg['max_source_length']}", field="max_source_length")
    for k in ("lora_r", "micro_batch_size", "gradient_accumulation_steps", "max_target_length", "logging_steps"):
        if cfg[k] < 1:
            raise UserError(f"must be >= 1, got {cfg[k]}", field=k)
    if not 0 <= cfg["lora_dropout"] < 1:
        raise UserError(f"must be in [0, 1), got {cfg['lora_dropout']}", field="lora_dropout")
    if cfg["learning_rate"] <= 0:
        raise UserError(f"must be > 0, got {cfg['learning_rate']}", field="learning_rate")
    if cfg["max_steps"] == 0 or cfg["max_steps"] < -1:
        raise UserError(f"must be -1 (epochs decide) or >= 1, got {cfg['max_steps']}", field="max_steps")
    return cfg, ignored


def read_examples(dataset_dir: str | os.PathLike, split: str = "train") -> list[dict]:
    """{id, source, target} from a dataset artifact's ``<split>.jsonl`` (ChatML messages)."""
    art = read_artifact(dataset_dir, stage="dataset")
    f = art.path / f"{split}.jsonl"
    if not f.is_file():
        if split == "train":
            raise UserError("dataset artifact has no train.jsonl", path=str(art.path))
        return []
    out = []
    for lineno, row in enumerate(read_jsonl(f, required=("id", "messages")), 1):
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            raise UserError("messages must be a list of {role, content}", path=str(f), line=lineno, field="messages")
        users = [m["content"] for m in msgs if m.get("role") == "user"]
        answers = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if not users or not answers:
            raise UserError("needs a user and an assistant message", path=str(f), line=lineno, field="messages")
        out.append({"id": str(row["id"]), "source": PROMPT.format(question=users[-1]), "target": answers[-1]})
    if not out and split == "train":
        raise UserError("no training examples", path=str(f))
    return out


def _targets(model_cfg, ffn: bool) -> list[str]:
    targets = list(ATTENTION_TARGETS)
    if ffn:
        gated = str(getattr(model_cfg, "feed_forward_proj", "")).startswith("gated") or \
            bool(getattr(model_cfg, "is_gated_act", False))
        targets += ["wi_0", "wi_1", "wo"] if gated else ["wi", "wo"]
    return targets


def write_stage(out, base_model, datasets: list[str], params: dict, force: bool = False) -> Artifact:
    """Write a ``stage.sft`` artifact for seq2seq LoRA (extra ``{"arch": "seq2seq"}``)."""
    from transformers import AutoConfig

    if not datasets:
        raise UserError("at least one dataset artifact is needed", field="--data")
    cfg, ignored = _check_params(params)
    base = _resolve_base(base_model)
    try:
        mcfg = AutoConfig.from_pretrained(str(base))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"unreadable model config ({type(e).__name__})", path=str(base / "config.json")) from None
    if not getattr(mcfg, "is_encoder_decoder", False) or mcfg.model_type not in T5_FAMILY:
        raise UserError(f"the seq2seq path trains T5-family encoder-decoders ({', '.join(T5_FAMILY)}); this model is "
                        f"{mcfg.model_type!r}: use the causal (Axolotl) path", path=str(base / "config.json"),
                        field="model_type")
    n_train, n_val = 0, 0
    for d in datasets:
        n_train += len(read_examples(d, "train"))
        n_val += len(read_examples(d, "validation"))
    targets = _targets(mcfg, cfg["ffn"])
    conf = {**cfg, "arch": "seq2seq", "base_model": str(base), "base_model_sha256": _fingerprint(base),
            "model_type": mcfg.model_type, "datasets": [str(Path(d).resolve()) for d in datasets],
            "target_modules": targets, "prompt": PROMPT, "ignored": ignored}
    stage_params = {k: v for k, v in conf.items() if k not in ("datasets", "base_model")}
    inputs = [base] if is_artifact(base) else []
    with Stage("stage.sft", out, stage_params, inputs=[*inputs, *datasets], force=force, log=log) as st:
        if st.skipped:
            return st.result
        write_json(st.path(CONFIG_FILE), conf)
        launch = st.path("launch.sh")
        launch.write_text("#!/usr/bin/env bash\n# seq2seq LoRA (transformers Seq2SeqTrainer + peft); Axolotl trains causal "
                          "LMs only\nset -euo pipefail\nexec tools train \"$(dirname \"$0\")\" \"$@\"\n", encoding="utf-8")
        launch.chmod(0o755)
        st.extra.update({"arch": "seq2seq", "base_model": str(base), "target_modules": targets,
                         "n_train": n_train, "n_validation": n_val, "ignored_params": sorted(ignored)})
    for k in sorted(ignored):
        log(f"note: {k} does not apply to the seq2seq path (ignored)")
    return st.result


class _Rows:
    """A torch-style dataset of tokenized examples."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _tokenize(tok, examples: list[dict], cfg: dict) -> tuple[_Rows, int]:
    rows, cut = [], 0
    for ex in examples:
        full = tok(ex["source"], add_special_tokens=True)["input_ids"]
        enc = tok(ex["source"], max_length=cfg["max_source_length"], truncation=True)
        cut += len(full) > cfg["max_source_length"]
        labels = tok(text_target=ex["target"], max_length=cfg["max_target_length"], truncation=True)["input_ids"]
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return _Rows(rows), cut


def _clean_history(hist: list[dict]) -> list[dict]:
    """The trainer's log history without wall-clock figures (data files carry no timings)."""
    drop = ("_runtime", "_per_second")
    return [{k: v for k, v in h.items() if not k.endswith(drop)} for h in hist]


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def train(stage_dir, dry_run: bool = False) -> Artifact:
    """Train the seq2seq LoRA of a ``stage.sft`` artifact into ``STAGE_DIR/output`` (a ``train`` artifact)."""
    stage = read_artifact(stage_dir, stage="stage.sft")
    if stage.extra.get("arch") != "seq2seq":
        raise UserError("not a seq2seq stage (manifest extra arch is not 'seq2seq')", path=str(stage.path))
    cfg_file = stage.file(CONFIG_FILE)
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable stage config ({e})", path=str(cfg_file)) from None
    base = Path(cfg["base_model"])
    train_ex = [ex for d in cfg["datasets"] for ex in read_examples(d, "train")]
    val_ex = [ex for d in cfg["datasets"] for ex in read_examples(d, "validation")]
    out = stage.path / "output"
    if dry_run:
        log(f"would train a seq2seq LoRA (r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, targets "
            f"{','.join(cfg['target_modules'])}) on {base} with {len(train_ex)} training examples"
            + (f" and {len(val_ex)} validation examples" if val_ex else "")
            + f": lr {cfg['learning_rate']}, batch {cfg['micro_batch_size']}x{cfg['gradient_accumulation_steps']}, "
              f"{'max_steps ' + str(cfg['max_steps']) if cfg['max_steps'] > 0 else str(cfg['num_epochs']) + ' epoch(s)'}, "
              f"source <= {cfg['max_source_length']} tokens, seed {cfg['seed']} -> {out}")
        return stage
    if not base.is_dir():
        raise UserError("the stage's base model folder is gone", path=str(base))
    if _fingerprint(base) != cfg["base_model_sha256"]:
        raise UserError("the base model changed since the stage was written: re-run `tools stage sft --arch seq2seq`",
                        path=str(base))
    params = {k: v for k, v in cfg.items() if k not in ("datasets", "base_model", "ignored")}
    with Stage("train", out, params, inputs=[stage.path, *cfg["datasets"]], log=log) as st:
        if st.skipped:
            return st.result
        st.extra.update(_run_training(cfg, base, train_ex, val_ex, st.work))
        write_json(st.path("log_history.json"), st.extra["log_history"])
    log(f"trained: final loss {st.result.extra['final_loss']:.4f}, {st.result.extra['trainable_params']} trainable "
        f"parameters -> {out}")
    return st.result


def _run_training(cfg: dict, base: Path, train_ex: list[dict], val_ex: list[dict], work: Path) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
        set_seed,
    )

    logging.getLogger("transformers").setLevel(logging.ERROR)
    set_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=cfg["lora_r"],
                                             lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                                             target_modules=cfg["target_modules"]))
    trainable, total = count_trainable(model)
    train_ds, cut = _tokenize(tok, train_ex, cfg)
    val_ds, _ = _tokenize(tok, val_ex, cfg) if val_ex else (None, 0)
    if cut:
        log(f"note: {cut} of {len(train_ex)} sources are longer than {cfg['max_source_length']} tokens and were cut")
    steps_per_epoch = -(-len(train_ds) // (cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"]))
    total_steps = cfg["max_steps"] if cfg["max_steps"] > 0 else int(round(steps_per_epoch * cfg["num_epochs"]))

    class _Progress(TrainerCallback):
        def __init__(self, advance):
            self.advance = advance

        def on_step_end(self, args, state, control, **kw):
            self.advance(1)

    tmp = Path(tempfile.mkdtemp(prefix=".trainer-", dir=work.parent))
    try:
        args = Seq2SeqTrainingArguments(
            output_dir=str(tmp), per_device_train_batch_size=cfg["micro_batch_size"],
            per_device_eval_batch_size=cfg["micro_batch_size"],
            gradient_accumulation_steps=cfg["gradient_accumulation_steps"], learning_rate=float(cfg["learning_rate"]),
            num_train_epochs=float(cfg["num_epochs"]), max_steps=cfg["max_steps"], warmup_steps=cfg["warmup_steps"],
            weight_decay=float(cfg["weight_decay"]), logging_steps=cfg["logging_steps"], save_strategy="no",
            eval_strategy="no", report_to=[], seed=cfg["seed"], data_seed=cfg["seed"], use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0, predict_with_generate=False, bf16=False, fp16=False)
        collator = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100)
        with progress("training (seq2seq LoRA)", total=total_steps, unit="steps") as advance:
            trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                     data_collator=collator, callbacks=[_Progress(advance)])
            trainer.train()
        if val_ds is not None:
            trainer.evaluate()
        model.save_pretrained(str(work))
        tok.save_pretrained(str(work))
        hist = _clean_history(trainer.state.log_history)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    losses = [h["loss"] for h in hist if "loss" in h]
    if not losses:
        raise WorkError("training logged no loss")
    if any(v != v for v in losses):
        step = next(h["step"] for h in hist if "loss" in h and h["loss"] != h["loss"])
        raise WorkError(f"training diverged (loss NaN at step {step})")
    extra = {"arch": "seq2seq", "base_model": str(base), "adapter": True, "log_history": hist, "final_loss": losses[-1],
             "trainable_params": trainable, "total_params": total, "target_modules": cfg["target_modules"],
             "n_train": len(train_ex), "truncated_sources": cut, "steps": trainer.state.global_step}
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    if evals:
        extra["eval_loss"] = evals[-1]
    return extra


def load_trained(train_dir):
    """(tokenizer, model) of a seq2seq ``train`` artifact: the base model with the LoRA adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    art = read_artifact(train_dir, stage="train")
    if art.extra.get("arch") != "seq2seq":
        raise UserError("not a seq2seq training output", path=str(art.path))
    base = Path(art.extra["base_model"])
    if not base.is_dir():
        raise UserError("the base model folder is gone", path=str(base))
    tok = AutoTokenizer.from_pretrained(str(art.path))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base), dtype=torch.float32)
    return tok, PeftModel.from_pretrained(model, str(art.path)).eval()


def predict(train_dir, dataset_dir, out, *, split: str = "test", max_new_tokens: int = 64, limit: int | None = None,
            force: bool = False) -> Artifact:
    """Greedy answers of a trained seq2seq adapter on a dataset split: ``items.jsonl`` of
    {id, prediction, reference}, the input ``tools eval semantic RESULTS_DIR`` reads."""
    import torch

    examples = read_examples(dataset_dir, split)
    if not examples:
        raise UserError(f"dataset has no {split}.jsonl", path=str(dataset_dir))
    examples = examples[:limit] if limit else examples
    art = read_artifact(train_dir, stage="train")
    with Stage("predict.seq2seq", out, {"split": split, "max_new_tokens": max_new_tokens, "limit": limit},
               inputs=[art.path, dataset_dir], force=force, log=log) as st:
        if st.skipped:
            return st.result
        tok, model = load_trained(train_dir)
        max_src = int(read_artifact(Path(train_dir)).params.get("max_source_length", MAX_SOURCE))
        rows = []
        with torch.no_grad(), progress("predicting", total=len(examples), unit="items") as advance:
            for ex in examples:
                enc = tok(ex["source"], max_length=max_src, truncation=True, return_tensors="pt")
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
                rows.append({"id": ex["id"], "prediction": tok.decode(ids[0], skip_special_tokens=True).strip(),
                             "reference": ex["target"]})
                advance()
        write_jsonl(st.path("items.jsonl"), rows)
        st.extra.update({"n": len(rows), "split": split})
    return st.result
