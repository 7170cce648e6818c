"""Hardware presets: devices x processes x nodes x sharding -> Axolotl keys, DeepSpeed JSON, launch lines.

One place decides how a stage runs on a machine:

==========================  ================================================================
preset                      what it writes
==========================  ================================================================
``--device cpu``            CPU keys (``recipes.axolotl_cpu.CPU_KEYS``), one process
                            (``axolotl train --launcher python``: no second interpreter)
``--device cpu --procs N``  plain DDP over gloo: ``accelerate launch --multi_gpu
                            --num_processes N`` with ``ACCELERATE_USE_CPU=true`` and the
                            start-up shim's CPU device map (:func:`launch_env`), threads
                            shared out (``OMP_NUM_THREADS`` = cores / N)
1 GPU                       ``axolotl train --launcher accelerate`` (Axolotl's default)
N GPUs, zero1/2/3           our DeepSpeed JSON in the stage folder, ``accelerate launch
                            --multi_gpu --num_processes N``
N GPUs, fsdp2               ``fsdp_version: 2`` + ``fsdp_config`` (layer class from the base
                            model's config), same accelerate launch line
M nodes (GPU or CPU)        ``torchrun`` with a c10d rendezvous on ``$MASTER_ADDR:$MASTER_PORT``
                            (``launch.sh`` runs on every node) and a SLURM ``slurm.sbatch``
==========================  ================================================================

Several CPU processes are real data parallelism (tests/recipes/test_train_distributed.py). Refused with the
reason before Axolotl is asked: DeepSpeed or FSDP on ``--device cpu``, ZeRO-3 with an 8-bit base, ZeRO-3 +
QLoRA without bf16. ZeRO-3 + QLoRA is written with ``bf16: true``. The evidence for each rule (read in the
pinned Axolotl, accelerate, transformers, DeepSpeed) is in docs/INTERNALS.md, "Hardware presets".
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.errors import UserError

from .axolotl_cpu import AXOLOTL_ENV, device_keys

SHARDS = ("none", "zero1", "zero2", "zero3", "fsdp2")
DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
DEFAULT_MASTER_PORT = 29500
SHIM_DIR = Path(__file__).resolve().parent / "seeding"  # the start-up shim's sitecustomize.py


@dataclass(frozen=True)
class Preset:
    device: str = "gpu"  # gpu | cpu
    gpus: int = 1        # processes per node: one per GPU, or CPU processes (--procs)
    nodes: int = 1
    shard: str = "none"  # none | zero1 | zero2 | zero3 | fsdp2

    @property
    def procs(self) -> int:
        return self.gpus

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def launcher(self) -> str:
        if self.nodes > 1:
            return "torchrun"
        if self.device == "cpu" and self.world_size == 1:
            return "python"
        return "accelerate"

    def describe(self) -> str:
        if self.device == "cpu":
            return ("cpu, one process" if self.world_size == 1 else
                    f"cpu, {self.procs} process(es) x {self.nodes} node(s), DDP over gloo")
        return f"{self.gpus} GPU(s) x {self.nodes} node(s), shard {self.shard}"

    @property
    def deepspeed_file(self) -> str | None:
        return f"deepspeed_{self.shard}.json" if self.shard.startswith("zero") else None

    def to_dict(self) -> dict:
        return asdict(self)


def make_preset(device: str = "gpu", gpus: int | None = None, nodes: int = 1, shard: str | None = None,
                procs: int | None = None) -> Preset:
    """Check the choice and fill in the defaults (several GPUs -> ZeRO-2, QLoRA-safe).

    ``procs`` is processes per node: on GPU one per GPU (it defaults to ``gpus``); on CPU it is the
    only way to ask for several processes (DDP over gloo, no sharding)."""
    if device not in ("gpu", "cpu"):
        raise UserError(f"unknown device {device!r} (gpu or cpu)", field="--device")
    if nodes is None or nodes < 1:
        raise UserError("--nodes must be at least 1", field="--nodes")
    if procs is not None and procs < 1:
        raise UserError("--procs must be at least 1", field="--procs")
    if device == "cpu":
        if gpus:
            raise UserError("--device cpu has no GPUs: ask for processes with --procs N", field="--gpus")
        procs = procs or 1
        if shard not in (None, "none"):
            raise UserError(f"--shard {shard} needs GPUs: DeepSpeed and FSDP through Axolotl hard-code the NCCL "
                            "backend and fail on CPU; several CPU processes train with plain DDP over gloo "
                            "(--procs N)", field="--shard")
        return Preset("cpu", procs, nodes, "none")
    if gpus is None:
        gpus = procs or 1
    elif procs is not None and procs != gpus:
        raise UserError(f"on GPUs each process drives one GPU: --procs {procs} differs from --gpus {gpus}",
                        field="--procs")
    if gpus < 1:
        raise UserError("--gpus must be at least 1", field="--gpus")
    if shard is None:
        shard = "none" if gpus * nodes == 1 else "zero2"
    if shard not in SHARDS:
        raise UserError(f"unknown shard {shard!r} ({', '.join(SHARDS)})", field="--shard")
    return Preset("gpu", gpus, nodes, shard)


def preset_choice(stored: dict | None) -> dict:
    """A stored preset (:meth:`Preset.to_dict`, a stage manifest's ``params.preset``) as the choice that makes
    it again: ``device``, ``gpus``, ``procs``, ``nodes``, ``shard`` for :func:`make_preset` and StageSpec
    (None where the preset says nothing). The one place that reads the stored field ``gpus`` as what it is:
    processes per node, GPUs on GPU and CPU processes (``procs``) on CPU; the field keeps its name, which
    predates CPU processes, because it is part of every stage's fingerprint."""
    stored = stored or {}
    cpu = stored.get("device") == "cpu"
    return {"device": stored.get("device"), "gpus": None if cpu else stored.get("gpus"),
            "procs": stored.get("gpus") if cpu else None, "nodes": stored.get("nodes"), "shard": stored.get("shard")}


# -- the base model, without loading it ----------------------------------------------------------

def local_model_file(base_model: str, name: str) -> Path | None:
    """A file of the base model: in its local folder, or in the HF cache for a Hub id (no network)."""
    p = Path(base_model)
    if p.is_dir():
        f = p / name
        return f if f.is_file() else None
    if p.exists() or base_model.count("/") != 1:
        return None
    try:  # a Hub id: only what is already in the local cache (no network)
        from huggingface_hub import try_to_load_from_cache
        got = try_to_load_from_cache(base_model, name)
    except Exception:  # noqa: BLE001
        return None
    return Path(got) if isinstance(got, str) and Path(got).is_file() else None


def read_model_config(base_model: str) -> dict | None:
    f = local_model_file(base_model, "config.json")
    if f is None:
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError("unreadable config.json", path=str(f)) from None


def layer_class(base_model: str) -> str | None:
    """The decoder layer class FSDP wraps, from the base model's config (local folder or HF cache)."""
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
        if preset.shard == "zero3" and config.get("load_in_4bit"):
            keys["bf16"] = True  # the 4-bit weights are stored in bf16 (module docstring)
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


def zero3(preset: Preset, config: dict) -> bool:
    ds = config.get("deepspeed")
    if preset.shard == "zero3":
        return True
    if isinstance(ds, str) and Path(ds).is_file():
        try:
            return json.loads(Path(ds).read_text()).get("zero_optimization", {}).get("stage") == 3
        except (OSError, ValueError):
            return False
    return False


def refuse_broken(preset: Preset, config: dict) -> None:
    """Known-broken mixes, refused with the reason before Axolotl sees them (module docstring)."""
    if zero3(preset, config) and config.get("load_in_8bit"):
        raise UserError("ZeRO-3 with an 8-bit base is broken: LLM.int8 weights are int8 tensors that ZeRO-3 cannot "
                        "partition with the bf16 ones (bnb_4bit_quant_storage exists for 4-bit only); use --qlora "
                        "(4-bit, bf16 storage), --shard zero2, or --lora without quantization", field="--shard")
    if zero3(preset, config) and config.get("load_in_4bit") and (config.get("bf16") is not True or config.get("fp16")):
        raise UserError("ZeRO-3 + QLoRA needs bf16: true (Axolotl 0.19 stores the 4-bit weights in bf16 and ZeRO-3 "
                        "partitions parameters of one dtype); a GPU without bf16 trains QLoRA with --shard zero2",
                        field="bf16")
    if preset.device == "cpu" and (config.get("deepspeed") or config.get("fsdp_version") or config.get("fsdp")):
        raise UserError("DeepSpeed/FSDP need GPUs: Axolotl 0.19 starts DeepSpeed on NCCL and accelerate 1.13 never "
                        "turns FSDP on for CPU processes; several CPU processes train with DDP over gloo (--procs N)",
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
    """Arguments after ``--`` that Axolotl hands to its launcher (``${VAR}`` expanded by the shell or
    by `tools train`)."""
    if preset.launcher == "torchrun":
        return ["--nnodes", str(preset.nodes), "--nproc_per_node", str(preset.gpus),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", "${MASTER_ADDR}:${MASTER_PORT}",
                "--rdzv_id", "${RDZV_ID}"]
    if preset.launcher == "accelerate" and preset.world_size > 1:
        # accelerate's multi-process launcher (torch.distributed.run underneath); on CPU the processes
        # get ACCELERATE_USE_CPU=true (launch_env), which makes accelerate pick gloo and wrap in DDP
        # (a busy port 29500 makes accelerate pick a free one on a single machine)
        return ["--multi_gpu", "--num_processes", str(preset.gpus), "--num_machines", "1"]
    return []


def launch_env(preset: Preset) -> dict[str, str]:
    """Environment a preset's processes need beyond AXOLOTL_ENV (several CPU processes).

    Measured with Axolotl 0.19 / accelerate 1.13 / transformers 5.16 on CPU: without
    ``ACCELERATE_USE_CPU`` accelerate reports ``DistributedType.NO`` on a machine without GPUs
    (``PartialState._prepare_backend`` only picks MULTI_CPU when told it runs on CPU), so nothing is
    all-reduced and the batches are not sharded: each rank trains its own copy (identical logged
    losses, since the logged loss is gathered, and different grad norms). ``MEDILORA_DEVICE=cpu``
    makes the start-up shim (recipes/seeding) map Axolotl's ``device_map {"": LOCAL_RANK}`` to the CPU.
    """
    if preset.device == "cpu" and preset.world_size > 1:
        return {"ACCELERATE_USE_CPU": "true", "MEDILORA_DEVICE": "cpu"}
    return {}


def cpu_threads(preset: Preset, cores: int | None = None) -> int | None:
    """Threads per CPU process (cores shared out); None when the preset runs one process or on GPUs."""
    if preset.device != "cpu" or preset.world_size == 1:
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // preset.procs)


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


def launch_script(preset: Preset, stage_dir: str, name: str, seed: int | None = None) -> str:
    """``launch.sh``: what `tools train` runs, runnable by hand (``bash launch.sh [preprocess|train]``).

    It sets what `tools train` sets: the offline environment, the start-up shim (seeding; CPU device
    map) on PYTHONPATH, and for several CPU processes the CPU/gloo switches and threads per process."""
    cfg = f"{stage_dir}/axolotl.yaml"
    pre, train = axolotl_commands(preset, cfg)
    env = dict(AXOLOTL_ENV)
    env.update(launch_env(preset))
    if seed is not None:
        env["MEDILORA_SEED"] = str(int(seed))
    lines = [
        "#!/usr/bin/env bash",
        f"# MediLoRA {name}: {preset.describe()}.",
        "# Written by `tools stage`; `tools train STAGE_DIR` runs the same two steps and records the",
        "# output as an artifact. Usage: bash launch.sh [preprocess|train|all]",
        "set -euo pipefail",
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())),
    ]
    lines.append(f'export PYTHONPATH={shlex.quote(str(SHIM_DIR))}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    if cpu_threads(preset, 1) is not None:
        lines.append(f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) / {preset.procs} > 0 ? '
                     f'$(nproc) / {preset.procs} : 1 ))}}"')
    lines.append('STEP="${1:-all}"')
    lines += [
        'if [ "$STEP" = preprocess ] || [ "$STEP" = all ]; then',
        f"  {_sh(pre)}",
        "fi",
        'if [ "$STEP" = train ] || [ "$STEP" = all ]; then',
    ]
    if preset.launcher == "torchrun":
        lines += [
            "  # every node runs this step (once the data is prepared); they meet at the rendezvous on the",
            "  # first node, MASTER_ADDR",
            '  : "${MASTER_ADDR:?set MASTER_ADDR to the first node (slurm.sbatch does)}"',
            f'  MASTER_PORT="${{MASTER_PORT:-{DEFAULT_MASTER_PORT}}}"',
            '  RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-medilora}}"',
        ]
    out = f"{stage_dir}/output"
    lines += [
        "  # a run killed earlier resumes from its newest whole checkpoint (recipes/train.py; `tools train`",
        "  # trains into checkpoints/ instead and resumes by itself)",
        f"  mkdir -p -m 700 {shlex.quote(out)}",
        f'  CKPT="$(python -m recipes.train --last-checkpoint {shlex.quote(out)} {preset.world_size} || true)"',
        f'  {_sh(train[:3])} ${{CKPT:+"--resume-from-checkpoint=$CKPT"}} {_sh(train[3:])}',
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
