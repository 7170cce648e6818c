"""What Axolotl needs on each device, measured once and kept here (not in each caller).

Measured with Axolotl 0.19 on a 2-core CPU machine (docs/CPU_FACTS.md):
- bf16/fp16/tf32 must be false, else Axolotl silently casts to fp16 on CPU;
- the LoRA Triton kernels crash on CPU once MLP layers are targeted;
- sample packing needs ``attn_implementation: sdpa`` (no flash-attention on CPU);
- local JSON/JSONL datasets need ``ds_type: json``.
"""
from __future__ import annotations

CPU_KEYS: dict = {
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_embedding_kernel": False,
    "attn_implementation": "sdpa",
    "flash_attention": False,
}

GPU_KEYS: dict = {
    "bf16": "auto",
    "tf32": True,
}

# Environment every Axolotl process gets: no telemetry, no Hub.
AXOLOTL_ENV: dict[str, str] = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
    # Same inputs and seed -> same bytes: peft writes target_modules from a set, whose order follows
    # the string hash seed; a fixed seed makes adapter_config.json (and what follows) reproducible.
    "PYTHONHASHSEED": "0",
}

LOCAL_DATASET_KEYS: dict = {"ds_type": "json"}


def device_keys(device: str) -> dict:
    if device == "cpu":
        return dict(CPU_KEYS)
    if device in ("gpu", "cuda"):
        return dict(GPU_KEYS)
    raise ValueError(f"unknown device {device!r} (cpu or gpu)")
