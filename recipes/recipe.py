"""A recipe: the Axolotl config of one training stage, built as a dict and checked by Axolotl.

Order of precedence (later wins): the MediLoRA defaults, what the data says (sequence length,
sample packing), the stage kind (completion or chat-template SFT), the adapter mode
(``--qlora``/``--lora``/``--full``), the hardware preset, the named options (``--lora-r``...), and
last ``--set key=value``. Then known-broken mixes are refused with the reason
(:func:`recipes.hardware.refuse_broken`) and the whole dict goes through Axolotl's own pydantic
config model (:func:`validate`); what Axolotl refuses is a UserError with Axolotl's message.
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from tools.errors import UserError
from tools.io import read_jsonl
from tools.progress import log

from .axolotl_cpu import AXOLOTL_ENV
from .hardware import SHIM_DIR, cpu_threads, launch_env, local_model_file

# The MediLoRA recipe (seed report): QLoRA r=8/alpha=16 on q/v, 8-bit AdamW, cosine, 2 epochs.
MEDILORA_DEFAULTS: dict[str, Any] = {
    "adapter": "qlora",
    "load_in_4bit": True,
    "load_in_8bit": False,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"],
    "optimizer": "adamw_bnb_8bit",
    "lr_scheduler": "cosine",
    "learning_rate": 2e-4,
    "warmup_steps": 100,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "num_epochs": 2,
    "seed": 42,
    "logging_steps": 1,
    # checkpoints every 5 % of the run's optimizer steps (a ratio: the HF Trainer turns it into
    # ceil(0.05 x total steps)) and at the last step; the two newest are kept. A killed or failed
    # `tools train` resumes from the last complete one (recipes/train.py), so a crash loses at most
    # 1/20 of the run. The last checkpoint's trainer_state.json is where `tools train` reads the
    # trainer's log history.
    "save_steps": 0.05,
    "save_total_limit": 2,
    "val_set_size": 0.0,
    "train_on_inputs": False,
    "strict": False,
}

ADAPTER_MODES = ("qlora", "lora", "full")
# `tools stage dpo --method`: preference objectives Axolotl trains from the pairs (dpo and ipo: TRL's
# DPOTrainer; simpo: its CPOTrainer; orpo: ORPOTrainer; kto: KTOTrainer, on unpaired rows). ORPO and KTO
# read other row layouts than DPO's ChatML pairs: the stage writes the pairs in theirs (preference_rows).
# GRPO is written and checked but generates with a vLLM server, so `tools train` refuses it on CPU
# (recipes/train.py); none of the others needs a GPU-only dependency.
RL_METHODS = ("dpo", "ipo", "simpo", "orpo", "kto", "grpo")
# Axolotl's prompt strategy per method (axolotl.prompt_strategies.{dpo,orpo,kto}); the rest: chatml.prompt_pairs
RL_DATASET_TYPES = {"orpo": "chat_template.argilla", "kto": "chatml.prompt_pairs"}
RL_BETA = 0.1  # TRL's default DPO beta
SEQ_BUCKETS = (256, 512, 1024, 2048, 4096)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_EOT = "<|im_end|>"
ROLES = ("system", "user", "assistant")

# named CLI options -> Axolotl keys
OPTION_KEYS = {
    "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "target_modules": "lora_target_modules", "epochs": "num_epochs", "max_steps": "max_steps",
    "lr": "learning_rate", "seq_len": "sequence_len", "micro_batch": "micro_batch_size",
    "grad_accum": "gradient_accumulation_steps", "warmup_steps": "warmup_steps",
    "packing": "sample_packing", "seed": "seed",
}


# -- the base model, without loading it ----------------------------------------------------------

def check_base_model(base_model: str, field: str = "--base-model") -> str:
    """A local folder must hold a HF checkpoint; a Hub id is passed on (resolved by Axolotl)."""
    if not base_model or not str(base_model).strip():
        raise UserError("base model is empty", field=field)
    p = Path(base_model).expanduser()
    looks_local = p.exists() or base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise UserError("base model folder not found", path=str(p), field=field)
        if not (p / "config.json").is_file():
            raise UserError("not a Hugging Face model folder (no config.json)", path=str(p), field=field)
        return str(p.resolve())
    return base_model


def tokenizer_info(base_model: str) -> dict | None:
    """What the base tokenizer holds (vocabulary, EOS), read from its files; None if not local."""
    tj = local_model_file(base_model, "tokenizer.json")
    if tj is None:
        return None
    try:
        doc = json.loads(tj.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError("unreadable tokenizer.json", path=str(tj)) from None
    vocab = doc.get("model", {}).get("vocab") or {}
    names = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab if isinstance(v, list) and v}
    names |= {t.get("content") for t in doc.get("added_tokens") or [] if isinstance(t, dict)}
    eos = None
    tc = local_model_file(base_model, "tokenizer_config.json")
    if tc is not None:
        try:
            tcd = json.loads(tc.read_text(encoding="utf-8"))
            eos = tcd.get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
        except (OSError, ValueError):
            pass
    return {"tokenizer_json": str(tj), "tokens": names, "eos": eos}


def chatml_keys(base_model: str, adapter: bool, continuing_adapter: bool) -> dict:
    """ChatML template and end-of-turn; add the ChatML tokens when the base lacks them."""
    keys: dict[str, Any] = {"chat_template": "chatml", "eot_tokens": [CHATML_EOT]}
    info = tokenizer_info(base_model)
    if info is None:
        log(f"note: tokenizer of {base_model} not found locally; assuming it has the ChatML tokens "
            "(else: --set tokens=['<|im_start|>','<|im_end|>'])")
        return keys
    missing = [t for t in CHATML_TOKENS if t not in info["tokens"]]
    if missing:
        if continuing_adapter:
            raise UserError("stage one's tokenizer lacks the ChatML tokens, so SFT must resize the embeddings, "
                            "which a continued adapter cannot: merge stage one and pass --merged DIR", field="--from")
        keys["tokens"] = list(CHATML_TOKENS)
        if adapter:  # new embedding rows must be trained and saved with the adapter
            keys["lora_modules_to_save"] = ["embed_tokens", "lm_head"]
    if info["eos"] != CHATML_EOT:
        keys["special_tokens"] = {"eos_token": CHATML_EOT}
    return keys


def rl_keys(method: str) -> dict:
    """The Axolotl keys of a preference stage (no sample packing: Axolotl refuses it with rl)."""
    keys: dict[str, Any] = {"rl": method, "sample_packing": False, "rl_beta": RL_BETA}
    if method == "kto":  # Axolotl's schema asks for it (KTO's collator needs the label column)
        keys["remove_unused_columns"] = False
    if method == "grpo":  # generation by a vLLM server, rewarded by the bench's answer check (a name, not an import)
        keys["trl"] = {"use_vllm": True, "vllm_mode": "server", "num_generations": 4, "max_completion_length": 64,
                       "reward_funcs": ["evals.rewards.answer_correct"]}
    return keys


# -- data ----------------------------------------------------------------------------------------

def preference_rows(method: str, pairs: list[dict]) -> list[dict] | None:
    """The pairs {id, system, prompt, chosen, rejected} in the layout ``method`` reads (None: as they are).
    ORPO (chat_template.argilla): chosen and rejected as [user, assistant] turns. KTO: unpaired rows, a
    pair -> one desirable (label true) and one undesirable (label false) completion of the same prompt."""
    if method == "orpo":
        def turns(p, answer):
            return [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}]
        return [{"id": p["id"], "system": p.get("system") or "", "prompt": p["prompt"],
                 "chosen": turns(p, p["chosen"]), "rejected": turns(p, p["rejected"])} for p in pairs]
    if method == "kto":
        return [{"id": f"{p['id']}:{side}", "system": p.get("system") or "", "prompt": p["prompt"],
                 "completion": p[side], "label": side == "chosen"} for p in pairs for side in ("chosen", "rejected")]
    return None


def _token_counter(base_model: str):
    """Token lengths with the base tokenizer when it is local (fast ``tokenizers``), else ~4 chars/token."""
    info = tokenizer_info(base_model)
    if info is not None:
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(info["tokenizer_json"])

            def count(texts: list[str]) -> list[int]:
                return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
            return count, "tokenizer"
        except Exception:  # noqa: BLE001 - an exotic tokenizer file: estimate instead
            pass
    return (lambda texts: [max(1, len(t) // 4) for t in texts]), "chars/4"


def chatml_text(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def check_messages(row: dict, path: Path, line: int) -> None:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise UserError("`messages` must be a non-empty list", path=str(path), line=line, field="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(f"message {i} needs role in {'/'.join(ROLES)} and a string content",
                            path=str(path), line=line, field=f"messages[{i}]")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError("no assistant turn (nothing to learn: the loss is on assistant turns only)",
                        path=str(path), line=line, field="messages")


def _pair_text(row: dict, path: Path, line: int) -> str:
    """The longer side of a preference pair as the model sees it (system, prompt, answer)."""
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(row[k], str) or not row[k].strip():
            raise UserError(f"empty or non-string `{k}`", path=str(path), line=line, field=k)
    msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": max(row["chosen"], row["rejected"], key=len)}]
    return chatml_text(msgs)


def scan_rows(files: list[Path], kind: str, sample: int = 4000) -> list[str]:
    """Check every row (file:line on a bad one); return up to ``sample`` texts as the model sees them."""
    texts: list[str] = []
    n = 0
    for f in files:
        line = 0
        required = {"completion": ("id", "text"), "dpo": ("id", "prompt", "chosen", "rejected")}.get(kind,
                                                                                                  ("id", "messages"))
        for line, row in enumerate(read_jsonl(f, required=required), 1):
            n += 1
            if kind == "dpo":
                t = _pair_text(row, f, line)
            elif kind == "completion":
                if not isinstance(row["text"], str) or not row["text"].strip():
                    raise UserError("empty or non-string `text`", path=str(f), line=line, field="text")
                t = row["text"]
            else:
                check_messages(row, f, line)
                t = chatml_text(row["messages"])
            if len(texts) < sample:
                texts.append(t)
    if n == 0:
        raise UserError("no rows", path=str(files[0]))
    return texts


def choose_length(base_model: str, texts: list[str], kind: str) -> dict:
    """Sequence length and packing from the data: SFT rows longer than ``sequence_len`` are dropped
    by Axolotl, so cover the longest (up to 4096); completion documents are split into chunks, so
    cover the 95th percentile (up to 2048). Pack when at least two rows fit a sequence on average."""
    count, how = _token_counter(base_model)
    lens = sorted(count(texts))
    p95 = lens[min(len(lens) - 1, int(0.95 * len(lens)))]
    chat = kind in ("sft", "dpo")
    need = (lens[-1] + 8) if chat else p95
    cap = 4096 if chat else 2048
    seq = next((b for b in SEQ_BUCKETS if b >= need and b <= cap), cap)
    median = statistics.median(lens)
    return {"sequence_len": seq, "sample_packing": bool(kind == "completion" or median * 2 <= seq),
            "token_stats": {"rows_scanned": len(lens), "max": lens[-1], "median": median, "p95": p95,
                            "counted_with": how, "longer_than_sequence_len": sum(1 for x in lens if x > seq)},
            "lengths": lens}


# -- --set -----------------------------------------------------------------------------------------

def parse_set(items: list[str] | tuple[str, ...]) -> dict:
    """``key=value`` (value read as YAML; dotted keys reach into mappings) -> nested dict."""
    import yaml

    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"expected key=value, got {item!r}", field="--set")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part.isidentifier() for part in key.split(".")):
            raise UserError(f"bad key {key!r}", field="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise UserError(f"{key}: value is not valid YAML ({' '.join(str(e).split())[:120]})", field="--set") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"{key}: {p} is set to a value and a mapping", field="--set")
        node[parts[-1]] = value
    return out


def apply_overrides(config: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` (a value of None removes the key)."""
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(config.get(k), dict):
            apply_overrides(config[k], v)
        elif v is None:
            config.pop(k, None)
        else:
            config[k] = copy.deepcopy(v)
    return config


def axolotl_fields() -> set[str]:
    from axolotl.utils.schemas.config import AxolotlConfigWCapabilities

    names = set()
    for name, f in AxolotlConfigWCapabilities.model_fields.items():
        names.add(name)
        if f.alias:
            names.add(f.alias)
        va = f.validation_alias
        for choice in getattr(va, "choices", ()) or ():
            if isinstance(choice, str):
                names.add(choice)
        if isinstance(va, str):
            names.add(va)
    return names


def check_keys(overrides: dict) -> None:
    """A typo in ``--set`` would be silently ignored by Axolotl (extra keys are allowed): refuse it."""
    known = axolotl_fields()
    for k in overrides:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{k} is not an Axolotl config key{hint}", field="--set")


# -- Axolotl's verdict ---------------------------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        msg = " ".join(record.getMessage().split())
        if msg not in self.records:
            self.records.append(msg)


def capabilities(device: str, world_size: int) -> tuple[dict, dict]:
    """What Axolotl is told about the target machine (an Ampere-class GPU for the GPU presets)."""
    from importlib.metadata import version  # lazy: `tools --help` imports this module; this costs ~60 ms

    gpu = device == "gpu"
    caps = {"bf16": gpu, "fp8": False, "tf32": gpu, "n_gpu": world_size,
            "compute_capability": "sm_80" if gpu else None}
    env = {"torch_version": version("torch").split("+")[0]}
    return caps, env


def validate(config: dict, device: str, world_size: int, where: str = "axolotl.yaml") -> list[str]:
    """Validate with Axolotl's own config model; return Axolotl's warnings. Raise UserError if refused."""
    from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
    from pydantic import ValidationError

    caps, env = capabilities(device, world_size)
    handler = _Collect()
    ax_logger = logging.getLogger("axolotl")
    old_prop = ax_logger.propagate
    ax_logger.addHandler(handler)
    ax_logger.propagate = False
    try:
        AxolotlConfigWCapabilities(**copy.deepcopy(config), capabilities=caps, env_capabilities=env)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            msgs.append(f"{loc}: {msg}" if loc else msg)
        raise UserError("Axolotl refuses this config: " + "; ".join(msgs), path=where) from None
    except (ValueError, TypeError) as e:
        raise UserError(f"Axolotl refuses this config: {e}", path=where) from None
    finally:
        ax_logger.removeHandler(handler)
        ax_logger.propagate = old_prop
    return handler.records


def dump_yaml(config: dict, header: str) -> str:
    import yaml

    body = yaml.safe_dump(config, sort_keys=True, default_flow_style=False, allow_unicode=True, width=100)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body


def env_for_axolotl(seed: int | None = None, preset=None) -> dict[str, str]:
    """The environment every Axolotl process gets: offline, no telemetry, the venv's bin first, the
    start-up shim (recipes/seeding/sitecustomize.py) on PYTHONPATH; with ``seed``, every process is
    seeded at start-up; with a ``preset`` of several CPU processes, the CPU/DDP switches and the
    threads per process (recipes.hardware.launch_env)."""
    env = dict(os.environ)
    env.update(AXOLOTL_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if seed is not None:
        env["MEDILORA_SEED"] = str(int(seed))
    if preset is not None:
        env.update(launch_env(preset))
        threads = cpu_threads(preset)
        if threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(threads))
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env
