"""Hardware presets: GPUs x nodes x sharding -> Axolotl keys, DeepSpeed JSON, launch lines.

One place decides how a stage runs on a machine:

========================  ==================================================================
preset                    what it writes
========================  ==================================================================
``--device cpu``          CPU keys (``recipes.profiles.CPU_KEYS``), one process
                          (``axolotl train --launcher python``: no second interpreter)
1 GPU                     ``axolotl train --launcher accelerate`` (Axolotl's default)
N GPUs, zero1/2/3         our DeepSpeed JSON in the stage folder, ``accelerate launch
                          --multi_gpu --num_processes N``
N GPUs, fsdp2             ``fsdp_version: 2`` + ``fsdp_config`` (layer class from the base
                          model's config), same accelerate launch line
M nodes                   ``torchrun`` with a c10d rendezvous on ``$MASTER_ADDR:$MASTER_PORT``
                          (``launch.sh`` runs on every node) and a SLURM ``slurm.sbatch``
========================  ==================================================================

Refused with the reason (before Axolotl is asked):

* ZeRO-3 with a 4-bit (or 8-bit) base: bitsandbytes' quantized parameters cannot be partitioned
  by ZeRO-3 (the run crashes or silently trains garbage); use ``--shard zero2`` (QLoRA-safe) or
  ``--shard fsdp2`` (FSDP2 + QLoRA);
* DeepSpeed or FSDP on ``--device cpu``: Axolotl hard-codes the NCCL backend (MEASURED.md);
* more than one GPU without sharding keys is plain DDP: allowed (``--shard none``).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.errors import UserError

from .profiles import AXOLOTL_ENV, device_keys

SHARDS = ("none", "zero1", "zero2", "zero3", "fsdp2")
DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Preset:
    device: str = "gpu"  # gpu | cpu
    gpus: int = 1        # GPUs per node
    nodes: int = 1
    shard: str = "none"  # none | zero1 | zero2 | zero3 | fsdp2

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def launcher(self) -> str:
        if self.device == "cpu":
            return "python"
        if self.nodes > 1:
            return "torchrun"
        return "accelerate"

    @property
    def deepspeed_file(self) -> str | None:
        return f"deepspeed_{self.shard}.json" if self.shard.startswith("zero") else None

    def to_dict(self) -> dict:
        return asdict(self)


def make_preset(device: str = "gpu", gpus: int | None = None, nodes: int = 1, shard: str | None = None) -> Preset:
    """Check the choice and fill in the defaults (several GPUs -> ZeRO-2, QLoRA-safe)."""
    if device not in ("gpu", "cpu"):
        raise UserError(f"unknown device {device!r} (gpu or cpu)", field="--device")
    if nodes is None or nodes < 1:
        raise UserError("--nodes must be at least 1", field="--nodes")
    if gpus is None:
        gpus = 0 if device == "cpu" else 1
    if device == "cpu":
        if gpus not in (0, 1) or nodes != 1:
            raise UserError("--device cpu runs one process on one machine (no --gpus/--nodes)", field="--device")
        if shard not in (None, "none"):
            raise UserError(f"--shard {shard} needs GPUs: DeepSpeed and FSDP through Axolotl hard-code the NCCL "
                            "backend and fail on CPU", field="--shard")
        return Preset("cpu", 1, 1, "none")
    if gpus < 1:
        raise UserError("--gpus must be at least 1", field="--gpus")
    if shard is None:
        shard = "none" if gpus * nodes == 1 else "zero2"
    if shard not in SHARDS:
        raise UserError(f"unknown shard {shard!r} ({', '.join(SHARDS)})", field="--shard")
    return Preset("gpu", gpus, nodes, shard)


def layer_class(base_model: str) -> str | None:
    """The decoder layer class FSDP wraps, from the base model's config (local folder or HF cache)."""
    from .recipe import read_model_config

    cfg = read_model_config(base_model)
    if not cfg:
        return None
    for arch in cfg.get("architectures") or []:
        try:
            import transformers
            cls = getattr(transformers, arch, None)
        except Exception:  # noqa: BLE001 - an odd transformers install: fall back to the name rule
            cls = None
        no_split = list(getattr(cls, "_no_split_modules", None) or [])
        if no_split:
            return no_split[0]
    mt = cfg.get("model_type")
    if mt:  # llama -> LlamaDecoderLayer, the rule most causal LMs in transformers follow
        return "".join(p.capitalize() for p in str(mt).split("_")) + "DecoderLayer"
    return None


def preset_keys(preset: Preset, base_model: str, config: dict) -> dict:
    """Axolotl keys for this preset (device keys, sharding). ``config`` is the recipe so far."""
    keys = device_keys(preset.device)
    if preset.device == "gpu":
        keys["gradient_checkpointing"] = True
    if preset.shard.startswith("zero"):
        keys["deepspeed"] = preset.deepspeed_file  # made absolute by the stage writer
    elif preset.shard == "fsdp2":
        cls = layer_class(base_model)  # None: the stage writer asks for --set fsdp_config.transformer_layer_cls_to_wrap
        quantized = bool(config.get("load_in_4bit") or config.get("load_in_8bit"))
        keys["fsdp_version"] = 2
        keys["fsdp_config"] = {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            **({"transformer_layer_cls_to_wrap": cls} if cls else {}),
            "reshard_after_forward": True,
            "offload_params": False,
            "state_dict_type": "FULL_STATE_DICT",
            # FSDP2 refuses cpu_ram_efficient_loading with a 4-bit base (Axolotl's check)
            "cpu_ram_efficient_loading": not quantized,
            # FSDP does the checkpointing: Axolotl refuses both at once
            "activation_checkpointing": True,
        }
        keys["gradient_checkpointing"] = False
    return keys


def refuse_broken(preset: Preset, config: dict) -> None:
    """Known-broken mixes, refused with the reason before Axolotl sees them."""
    quant = "4-bit" if config.get("load_in_4bit") else "8-bit" if config.get("load_in_8bit") else None
    ds = config.get("deepspeed")
    zero3 = preset.shard == "zero3"
    if isinstance(ds, str) and not zero3 and Path(ds).is_file():
        try:
            zero3 = json.loads(Path(ds).read_text()).get("zero_optimization", {}).get("stage") == 3
        except (OSError, ValueError):
            pass
    if zero3 and quant:
        raise UserError(f"ZeRO-3 with a {quant} base is broken: bitsandbytes' quantized weights cannot be "
                        "partitioned by ZeRO-3; use --shard zero2 (QLoRA-safe) or --shard fsdp2 (FSDP2+QLoRA), "
                        "or --lora/--full without quantization", field="--shard")
    if preset.device == "cpu" and (config.get("deepspeed") or config.get("fsdp_version") or config.get("fsdp")):
        raise UserError("DeepSpeed/FSDP need GPUs: Axolotl hard-codes the NCCL backend (fails on CPU)",
                        field="--device")
    fc = config.get("fsdp_config") or {}
    if config.get("fsdp_version") and fc.get("auto_wrap_policy") == "TRANSFORMER_BASED_WRAP" \
            and not fc.get("transformer_layer_cls_to_wrap"):
        raise UserError("cannot tell the decoder layer class FSDP2 should wrap (the base model's config.json is not "
                        "local): pass --set fsdp_config.transformer_layer_cls_to_wrap=NAME", field="--shard")
    if config.get("deepspeed") and (config.get("fsdp_version") or config.get("fsdp_config")):
        raise UserError("DeepSpeed and FSDP cannot be used together", field="--shard")


def deepspeed_json(shard: str) -> str:
    """Our DeepSpeed config for ``shard`` (Axolotl's are not in its wheel; `axolotl fetch` needs GitHub)."""
    f = DEEPSPEED_DIR / f"{shard}.json"
    return json.dumps(json.loads(f.read_text(encoding="utf-8")), indent=2, sort_keys=True) + "\n"


# -- launch lines --------------------------------------------------------------------------------

def launcher_args(preset: Preset) -> list[str]:
    """Arguments after ``--`` that Axolotl hands to its launcher."""
    if preset.launcher == "torchrun":
        return ["--nnodes", str(preset.nodes), "--nproc_per_node", str(preset.gpus),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", "${MASTER_ADDR}:${MASTER_PORT}",
                "--rdzv_id", "${RDZV_ID}"]
    if preset.launcher == "accelerate" and preset.world_size > 1:
        return ["--multi_gpu", "--num_processes", str(preset.gpus), "--num_machines", "1"]
    return []


def axolotl_commands(preset: Preset, config_file: str, axolotl: str = "axolotl",
                     overrides: dict | None = None) -> tuple[list[str], list[str]]:
    """(preprocess argv, train argv). ``overrides`` become ``--key=value`` config options."""
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in sorted((overrides or {}).items())]
    pre = [axolotl, "preprocess", config_file, *extra]
    train = [axolotl, "train", config_file, "--launcher", preset.launcher, *extra]
    la = launcher_args(preset)
    if la:
        train += ["--", *la]
    return pre, train


def _sh(argv: list[str]) -> str:
    """Shell words: ``${VAR}`` arguments stay expandable (double quotes), the rest single-quoted."""
    return " ".join(f'"{a}"' if "${" in a else shlex.quote(a) for a in argv)


def launch_script(preset: Preset, stage_dir: str, name: str) -> str:
    """``launch.sh``: what `tools train` runs, runnable by hand (``bash launch.sh [preprocess|train]``)."""
    cfg = f"{stage_dir}/axolotl.yaml"
    pre, train = axolotl_commands(preset, cfg)
    env = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(AXOLOTL_ENV.items()))
    lines = [
        "#!/usr/bin/env bash",
        f"# MediLoRA {name}: " + ("cpu, one process." if preset.device == "cpu" else
                                 f"{preset.gpus} GPU(s) x {preset.nodes} node(s), shard {preset.shard}."),
        "# Written by `tools stage`; `tools train STAGE_DIR` runs the same two steps and records the",
        "# output as an artifact. Usage: bash launch.sh [preprocess|train|all]",
        "set -euo pipefail",
        env,
        'STEP="${1:-all}"',
    ]
    if preset.launcher == "torchrun":
        lines += [
            "# every node runs this script; they meet at the rendezvous on the first node",
            ': "${MASTER_ADDR:?set MASTER_ADDR to the first node (slurm.sbatch does)}"',
            f'MASTER_PORT="${{MASTER_PORT:-{DEFAULT_MASTER_PORT}}}"',
            'RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-medilora}}"',
        ]
    lines += [
        'if [ "$STEP" = preprocess ] || [ "$STEP" = all ]; then',
        f"  {_sh(pre)}",
        "fi",
        'if [ "$STEP" = train ] || [ "$STEP" = all ]; then',
        f"  {_sh(train)}",
        "fi",
        "",
    ]
    return "\n".join(lines)


def sbatch_script(preset: Preset, stage_dir: str, name: str) -> str:
    """``slurm.sbatch`` for M nodes: preprocess once, then one launch.sh per node."""
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={preset.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={preset.gpus}",
        f"#SBATCH --output={stage_dir}/slurm-%j.log",
        "# MediLoRA: written by `tools stage`. Submit with `sbatch slurm.sbatch` from a node that sees",
        "# the stage folder, the data and the base model at the same paths (shared file system).",
        "set -euo pipefail",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'export MASTER_PORT="${{MASTER_PORT:-{DEFAULT_MASTER_PORT}}}"',
        'export RDZV_ID="$SLURM_JOB_ID"',
        f"srun --nodes=1 --ntasks=1 bash {shlex.quote(stage_dir + '/launch.sh')} preprocess",
        f"srun --nodes={preset.nodes} --ntasks-per-node=1 bash {shlex.quote(stage_dir + '/launch.sh')} train",
        "",
    ])
