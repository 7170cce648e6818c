"""`tools stage completion|sft`: write an Axolotl stage folder (axolotl.yaml, launch.sh, manifest).

The stage folder ``OUT`` holds ``axolotl.yaml`` (validated by Axolotl's own config model),
``launch.sh``, our DeepSpeed JSON when the preset shards with ZeRO, ``slurm.sbatch`` for several
nodes, and the manifest (stage ``stage.completion`` / ``stage.sft``, extra ``arch: causal``).
Axolotl writes into ``OUT/output`` (``tools train`` makes it an artifact) and caches the tokenized
data in ``OUT/prepared``.

Stage two (SFT ``--from STAGE_DIR``) reads stage one's manifests:

* stage one trained a full model -> SFT starts from ``STAGE_DIR/output`` (a full checkpoint);
* stage one trained an adapter and ``--merged DIR`` names the ``merge`` artifact made from it ->
  SFT trains a new adapter on the merged weights (``base_model: DIR``); release merges the SFT
  adapter into DIR. This is the cleaner choice when the SFT adapter should differ (rank, targets,
  new tokens);
* stage one trained an adapter and no merge is given -> SFT continues training that same adapter
  on stage one's base (``base_model`` = stage one's base, ``lora_model_dir`` = stage one's output:
  Axolotl loads it with ``PeftModel.from_pretrained(..., is_trainable=True)``). The saved
  ``adapter_config.json`` then governs rank, alpha and targets, so they are copied from it (a
  conflicting ``--lora-r`` is refused); release merges the final adapter into stage one's base.
  Adapter mode and hardware preset are inherited from stage one unless given.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tools.artifact import Artifact, Stage, is_artifact, read_artifact
from tools.errors import UserError
from tools.io import read_jsonl, write_jsonl
from tools.progress import log
from tools.stages import DATASET_PAIRS, STAGE, STAGE_DPO

from . import hardware as P
from . import recipe as R
from . import seq2seq

STAGE_NAMES = {"completion": "stage.completion", "sft": "stage.sft", "dpo": STAGE_DPO}


def _data_files(kind: str, dirs: list[str]) -> tuple[list[Path], list[Path]]:
    """(training files, validation files) of the corpus / dataset artifacts."""
    if not dirs:
        raise UserError(f"at least one {'--corpus' if kind == 'completion' else '--dataset'} is needed",
                        field="--corpus" if kind == "completion" else "--dataset")
    train, val = [], []
    for d in dirs:
        if kind == "dpo":
            train.append(read_artifact(d, stage=DATASET_PAIRS).file("train.jsonl").resolve())
        elif kind == "completion":
            art = read_artifact(d, stage="corpus")
            train.append(art.file("corpus.jsonl").resolve())
        else:
            art = read_artifact(d, stage="dataset")
            train.append(art.file("train.jsonl").resolve())
            v = art.path / "validation.jsonl"
            if v.is_file() and "validation.jsonl" in art.outputs():
                val.append(v.resolve())
    return train, val


def _mode_keys(mode: str) -> dict:
    if mode == "qlora":
        return {"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": False}
    if mode == "lora":
        return {"adapter": "lora", "load_in_4bit": False, "load_in_8bit": False}
    if mode == "full":
        return {"adapter": None, "load_in_4bit": False, "load_in_8bit": False, "lora_r": None, "lora_alpha": None,
                "lora_dropout": None, "lora_target_modules": None}
    raise UserError(f"unknown adapter mode {mode!r} ({', '.join(R.ADAPTER_MODES)})", field="--mode")


def resolve_from(from_stage: str, merged: str | None) -> dict:
    """What stage two starts from, read from stage one's manifests (see the module docstring)."""
    s1 = read_artifact(from_stage, stage=STAGE)
    out = Path(from_stage) / "output"
    if not is_artifact(out):
        raise UserError("stage one has not finished training (no manifest in output/): run `tools train` on it "
                        "first", path=str(out), field="--from")
    trained = read_artifact(out, stage="train")
    s1_base = trained.extra.get("base_model") or s1.params.get("base_model")
    is_adapter = bool(trained.extra.get("adapter"))
    res: dict[str, Any] = {"stage_one": str(Path(from_stage).resolve()), "stage_one_output": str(out.resolve()),
                           "stage_one_adapter": is_adapter, "inputs": [out],
                           "inherit": {"preset": s1.params.get("preset"), "mode": s1.params.get("mode")}}
    if merged:
        m = read_artifact(merged, stage="merge")
        trains = [i for i in m.manifest.get("inputs", []) if str(i.get("stage", "")).startswith("train")]
        if trains and not any(i.get("sha256") == trained.digest for i in trains):
            raise UserError("this merge was not made from stage one's output (its training input differs)",
                            path=str(merged), field="--merged")
        res.update(base_model=str(m.path.resolve()), start="merged", lora_model_dir=None)
        res["inputs"].append(m.path)
    elif is_adapter:
        if not s1_base:
            raise UserError("stage one's manifest names no base model", path=str(out), field="extra.base_model")
        acfg = trained.path / "adapter_config.json"
        try:
            ad = json.loads(acfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError("stage one's adapter has no readable adapter_config.json", path=str(acfg)) from None
        res.update(base_model=str(s1_base), start="adapter", lora_model_dir=str(trained.path.resolve()),
                   adapter_config={"lora_r": ad.get("r"), "lora_alpha": ad.get("lora_alpha"),
                                   "lora_dropout": ad.get("lora_dropout"),
                                   "lora_target_modules": sorted(ad.get("target_modules") or [])})
    else:
        if not (trained.path / "config.json").is_file():
            raise UserError("stage one trained a full model but its output has no config.json", path=str(out))
        res.update(base_model=str(trained.path.resolve()), start="full", lora_model_dir=None)
    return res


REPLAY_FILE = "replay.jsonl"
PREFERENCE_FILE = "preference.jsonl"  # ORPO/KTO stages: the pairs in the layout the method reads


def replay_rows(spec: "StageSpec", train_files: list[Path]) -> dict:
    """The replay rows mixed into a stage: a seeded sample of the replay data sized so that it is
    ``replay_ratio`` of the mixed rows (k = ratio x n / (1 - ratio), n = the stage's own rows). Done
    here, at dataset build time: Axolotl 0.19 concatenates and shuffles datasets but has no mixing ratio."""
    ratio = spec.replay_ratio if spec.replay_ratio is not None else 0.1
    art = read_artifact(spec.replay, stage="corpus" if spec.kind == "completion" else "dataset")
    pool = list(read_jsonl(art.file("corpus.jsonl" if spec.kind == "completion" else "train.jsonl")))
    n = sum(1 for f in train_files for _ in read_jsonl(f))
    k = round(ratio * n / (1 - ratio))
    if k < 1:
        raise UserError(f"--replay-ratio {ratio} of {n} rows is no replay row at all", field="--replay-ratio")
    rng = random.Random(f"medilora-replay:{spec.seed if spec.seed is not None else 42}")
    rows = rng.sample(pool, k) if k <= len(pool) else [pool[i % len(pool)] for i in range(k)]
    if k > len(pool):
        log(f"replay: {k} rows wanted, the replay data has {len(pool)}: repeated")
    return {"data": str(art.path.resolve()), "ratio": ratio, "rows_own": n, "rows_replay": k,
            "pool": len(pool), "rows": rows}


@dataclass
class Resolved:
    """What write_stage decided from a StageSpec: the base, the start (stage one), preset, mode."""

    spec: "StageSpec"
    out: Path
    base_model: str
    preset: P.Preset
    mode: str
    options: dict
    overrides: dict
    start: dict | None
    inputs: list[Path]


def _dataset_entry(kind: str, path: Path, method: str | None = None) -> dict:
    if kind == "completion":
        return {"path": str(path), "type": "completion", "ds_type": "json", "field": "text"}
    if kind == "dpo":  # rows {system, prompt, chosen, rejected} (ChatML pairs) or their ORPO/KTO layout
        return {"path": str(path), "type": R.RL_DATASET_TYPES.get(method or "dpo", "chatml.prompt_pairs"),
                "ds_type": "json", "split": "train"}
    return {"path": str(path), "type": "chat_template", "ds_type": "json", "split": "train",
            "field_messages": "messages", "message_property_mappings": {"role": "role", "content": "content"},
            "roles_to_train": ["assistant"], "train_on_eos": "turn"}


def build(r: Resolved, train_files: list[Path], val_files: list[Path]) -> tuple[dict, dict]:
    """The Axolotl config dict and what was decided from the data (for the manifest)."""
    kind, out, base_model, preset, start = r.spec.kind, r.out, r.base_model, r.preset, r.start
    texts = R.scan_rows(train_files + val_files, kind)
    decided = R.choose_length(base_model, texts, kind)
    cfg: dict[str, Any] = dict(R.MEDILORA_DEFAULTS)
    cfg.update(base_model=base_model, output_dir=str(out / "output"), dataset_prepared_path=str(out / "prepared"),
               sequence_len=decided["sequence_len"], sample_packing=decided["sample_packing"])
    cfg["datasets"] = [_dataset_entry(kind, f) for f in train_files]
    if r.spec.replay:
        decided["replay"] = replay_rows(r.spec, train_files)
        cfg["datasets"].append(_dataset_entry(kind, out / REPLAY_FILE))
    if val_files:
        cfg["test_datasets"] = [_dataset_entry(kind, f) for f in val_files]
        cfg["evals_per_epoch"] = 1
    if kind == "dpo":
        cfg.update(R.rl_keys(r.spec.method or "dpo"))
        rows = R.preference_rows(r.spec.method or "dpo", [x for f in train_files for x in read_jsonl(f)])
        if rows is not None:  # ORPO/KTO: the pairs rewritten in their layout, into the stage folder
            decided["preference"] = {"method": r.spec.method, "pairs": len(rows) // (2 if r.spec.method == "kto" else 1),
                                     "rows": rows}
            cfg["datasets"] = [_dataset_entry(kind, out / PREFERENCE_FILE, r.spec.method)]
    R.apply_overrides(cfg, _mode_keys(r.mode))
    continuing = bool(start and start.get("lora_model_dir"))
    if continuing:
        cfg["lora_model_dir"] = start["lora_model_dir"]
        R.apply_overrides(cfg, {k: v for k, v in start["adapter_config"].items() if v is not None})
    if kind in ("sft", "dpo"):
        cfg.update(R.chatml_keys(base_model, adapter=r.mode != "full", continuing_adapter=continuing))
    keys = P.preset_keys(preset, base_model, cfg)
    if preset.device == "gpu" and cfg.get("sample_packing"):
        keys["attn_implementation"] = "flash_attention_2"  # packing without cross-sample attention
    elif preset.device == "gpu":
        keys["attn_implementation"] = "sdpa"
    if keys.get("fsdp_version") and cfg.get("optimizer") == "adamw_bnb_8bit" and "optimizer" not in r.overrides:
        # bitsandbytes' 8-bit states are not DTensors: FSDP2 cannot shard them
        keys["optimizer"] = "adamw_torch_fused"
    R.apply_overrides(cfg, keys)
    named = {R.OPTION_KEYS[k]: v for k, v in r.options.items() if v is not None}
    if continuing:
        for k in ("lora_r", "lora_alpha", "lora_target_modules"):
            if k in named and named[k] != cfg.get(k):
                raise UserError(f"{kind.upper()} continues stage one's adapter, whose {k}={cfg.get(k)} governs; pass "
                                "--merged DIR (stage one merged) to train a new adapter", field=k)
    R.apply_overrides(cfg, named)
    R.apply_overrides(cfg, r.overrides)
    _finish_cfg(cfg, r, decided)
    return cfg, decided


def _finish_cfg(cfg: dict, r: Resolved, decided: dict) -> None:
    """Checkpoint schedule, CPU attention, DeepSpeed file, and the SFT rows Axolotl would drop."""
    # checkpoints: the default save_steps gives way to a save schedule the user asked for
    if "save_steps" not in r.overrides and ("saves_per_epoch" in r.overrides or
                                            r.overrides.get("save_strategy") not in (None, "steps")):
        cfg.pop("save_steps", None)
    if cfg.get("sample_packing") and r.preset.device == "cpu":
        cfg.setdefault("attn_implementation", "sdpa")
    if r.preset.deepspeed_file:
        cfg["deepspeed"] = str(r.out / r.preset.deepspeed_file)
    lens = decided.pop("lengths")
    seq = int(cfg.get("sequence_len") or 0)
    if r.spec.kind in ("sft", "dpo") and seq:
        # Axolotl drops SFT rows longer than sequence_len; with none left its preprocess dies with a
        # cryptic "empty range for randrange()", so say it here, before anything is written.
        too_long = sum(1 for x in lens if x > seq)
        decided["token_stats"]["longer_than_sequence_len"] = too_long
        if too_long == len(lens):
            raise UserError(f"every scanned row is longer than sequence_len={seq} (shortest {lens[0]} tokens, "
                            f"counted with the base tokenizer): Axolotl would drop them all; raise --seq-len",
                            field="--seq-len")
        if too_long:
            log(f"note: {too_long} of {len(lens)} scanned rows are longer than sequence_len={seq}; "
                "Axolotl drops them")


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage folder is written from: the single source of `tools stage`'s options (the
    Click options of `stage completion|sft` are checked against these fields at start-up) and of
    write_stage's arguments. `tools sweep` derives a trial with ``dataclasses.replace(spec, out=...,
    set_items=...)`` from ``StageSpec.from_params`` of the swept stage's manifest."""

    kind: str                                   # completion | sft | dpo (preference: --method)
    out: str | os.PathLike
    data: tuple[str, ...] = ()                  # corpus (completion) or dataset (sft) artifact folders
    base_model: str | None = None
    from_stage: str | None = None               # sft: stage one's folder
    merged: str | None = None                   # sft with from_stage: stage one's merge artifact
    arch: str = "causal"                        # causal (Axolotl) | seq2seq
    # hardware preset
    device: str | None = None
    gpus: int | None = None
    procs: int | None = None
    nodes: int | None = None
    shard: str | None = None
    mode: str | None = None                     # qlora | lora | full
    # training options (recipes.recipe.OPTION_KEYS: None = the recipe's default)
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: tuple[str, ...] | None = None
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    seq_len: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    warmup_steps: int | None = None
    packing: bool | None = None
    seed: int | None = None
    set_items: tuple[str, ...] = ()             # KEY=VALUE Axolotl overrides, applied last
    force: bool = False
    method: str | None = None                   # dpo stages: recipes.recipe.RL_METHODS (default dpo)
    replay: str | None = None                   # completion/sft: general data mixed in (corpus or dataset artifact)
    replay_ratio: float | None = None           # its share of the mixed training rows (default 0.1)

    def options(self) -> dict:
        """The training options that were given (the recipe fills in the others)."""
        opts = {k: getattr(self, k) for k in R.OPTION_KEYS if getattr(self, k) is not None}
        if "target_modules" in opts:
            opts["target_modules"] = list(opts["target_modules"])
        if "epochs" in opts and float(opts["epochs"]).is_integer():
            opts["epochs"] = int(opts["epochs"])
        return opts

    @classmethod
    def from_params(cls, params: dict, out: str | os.PathLike, **changes) -> "StageSpec":
        """The spec that wrote a stage, from its manifest's params (``changes`` applied on top)."""
        sets = params.get("set") or {}
        return replace(cls(kind=params["kind"], out=out, data=tuple(params["data"]),
                           base_model=None if params.get("from") else params["base_model"],
                           from_stage=params.get("from"), merged=params.get("merged"),
                           **P.preset_choice(params.get("preset")), mode=params.get("mode"), method=params.get("method"),
                           replay=(params.get("replay") or {}).get("data"),
                           replay_ratio=(params.get("replay") or {}).get("ratio"), **(params.get("options") or {}),
                           set_items=tuple(f"{k}={json.dumps(v)}" for k, v in sorted(sets.items()))), **changes)


def write_stage(spec: StageSpec) -> Artifact:
    """Write a completion, SFT or preference (dpo) stage folder (causal through Axolotl, or seq2seq);
    return its artifact."""
    if spec.arch == "seq2seq":
        return _write_seq2seq(spec)
    r = _resolve(spec)
    train_files, val_files = _data_files(spec.kind, list(spec.data))
    cfg, decided = build(r, train_files, val_files)
    P.refuse_broken(r.preset, cfg)
    art = _write(r, cfg, decided)
    log(f"{art.stage}: wrote {r.out}/axolotl.yaml ({r.mode}, sequence_len {cfg.get('sequence_len')}, "
        f"packing {cfg.get('sample_packing')}, launcher {r.preset.launcher}); train with `tools train {r.out}`")
    return art


def _check_spec(spec: StageSpec) -> None:
    if spec.device == "cpu" and spec.gpus is not None:
        raise UserError("--device cpu has no GPUs: ask for several processes with --procs N", field="--gpus")
    if spec.kind not in STAGE_NAMES:
        raise UserError(f"unknown stage kind {spec.kind!r}", field="kind")
    if spec.method is not None and (spec.kind != "dpo" or spec.method not in R.RL_METHODS):
        raise UserError(f"--method is one of {', '.join(R.RL_METHODS)} for `tools stage dpo`", field="--method")
    for k in spec.options():
        if k not in R.OPTION_KEYS:
            raise UserError(f"unknown option {k!r}", field=k)
    if (spec.replay or spec.replay_ratio is not None) and spec.kind == "dpo":
        raise UserError("--replay is for completion and SFT stages", field="--replay")
    if spec.replay_ratio is not None and not (spec.replay and 0 < spec.replay_ratio < 1):
        raise UserError("--replay-ratio is a share in (0, 1) of the mixed rows, with --replay DATA", field="--replay-ratio")
    if spec.kind == "dpo" and not spec.from_stage:
        raise UserError("a preference stage starts from a trained SFT stage: --from STAGE_DIR", field="--from")
    if spec.from_stage and spec.kind == "completion":
        raise UserError("--from is for SFT and preference stages", field="--from")
    if spec.from_stage and spec.base_model:
        raise UserError("give either --from STAGE_DIR or --base-model, not both", field="--base-model")
    if spec.merged and not spec.from_stage:
        raise UserError("--merged goes with --from STAGE_DIR", field="--merged")


def _resolve(spec: StageSpec) -> Resolved:
    """Checks, stage one's start (``--from``), the preset and adapter mode inherited from it."""
    _check_spec(spec)
    overrides = R.parse_set(list(spec.set_items))
    if overrides:
        R.check_keys(overrides)
    device, gpus, nodes, shard, procs, mode = spec.device, spec.gpus, spec.nodes, spec.shard, spec.procs, spec.mode
    start, base_model, inputs = None, spec.base_model, []
    if spec.from_stage:
        start = resolve_from(spec.from_stage, spec.merged)
        base_model, inputs = start["base_model"], list(start["inputs"])
        ip = start["inherit"].get("preset") or {}
        if device is None and gpus is None and nodes is None and shard is None and procs is None and ip:
            c = P.preset_choice(ip)
            device, gpus, nodes, shard, procs = c["device"], c["gpus"], c["nodes"], c["shard"], c["procs"]
        elif device is None and ip:
            device = ip.get("device")  # e.g. --procs 4 on stage one's CPU
        if mode is None:
            mode = start["inherit"].get("mode") if start["start"] == "adapter" else None
        if start["start"] == "adapter" and mode == "full":
            raise UserError("SFT continues stage one's adapter: --full needs stage one merged (--merged DIR)",
                            field="--full")
    if not base_model:
        raise UserError("--base-model (a HF folder or Hub id) or --from STAGE_DIR is required", field="--base-model")
    base_model = R.check_base_model(base_model)
    if is_artifact(base_model) and Path(base_model) not in [Path(i).resolve() for i in inputs]:
        inputs.append(Path(base_model))
    mode = mode or "qlora"
    if mode not in R.ADAPTER_MODES:
        raise UserError(f"unknown adapter mode {mode!r}", field="--mode")
    return Resolved(spec, Path(spec.out).expanduser().resolve(), base_model,
                    P.make_preset(device or "gpu", gpus, nodes or 1, shard, procs), mode, spec.options(), overrides,
                    start, [Path(d) for d in spec.data] + inputs + ([Path(spec.replay)] if spec.replay else []))


def _write(r: Resolved, cfg: dict, decided: dict) -> Artifact:
    """The stage folder: axolotl.yaml (validated by Axolotl), launch.sh, DeepSpeed JSON, sbatch, manifest."""
    spec, preset, start = r.spec, r.preset, r.start
    name = STAGE_NAMES[spec.kind]
    params = {"kind": spec.kind, "arch": "causal", "base_model": r.base_model,
              "data": [str(Path(d).resolve()) for d in spec.data], "from": start["stage_one"] if start else None,
              "merged": str(Path(spec.merged).resolve()) if spec.merged else None, "preset": preset.to_dict(),
              "mode": r.mode, "options": r.options, "set": r.overrides}
    if spec.kind == "dpo":  # a new kind: the parameters of completion and SFT stages keep their fingerprints
        params["method"] = spec.method or "dpo"
    if spec.replay:  # likewise: stages without replay keep their fingerprints
        params["replay"] = {"data": str(Path(spec.replay).resolve()), "ratio": spec.replay_ratio or 0.1}
    with Stage(name, r.out, params, inputs=r.inputs, force=spec.force, log=log) as st:
        if st.skipped:
            return st.result
        check_cfg = cfg
        if preset.deepspeed_file:
            st.path(preset.deepspeed_file).write_text(P.deepspeed_json(preset.shard), encoding="utf-8")
            check_cfg = dict(cfg, deepspeed=str(st.path(preset.deepspeed_file)))
        warnings = R.validate(check_cfg, preset.device, preset.world_size, where=str(r.out / "axolotl.yaml"))
        for w in warnings:
            log(f"axolotl: {w}")
        header = (f"MediLoRA {name} for {r.base_model}\n"
                  f"preset: {preset.describe()}; launcher {preset.launcher}\n"
                  "Written by `tools stage` and validated with Axolotl's config schema; run with `tools train`.")
        st.path("axolotl.yaml").write_text(R.dump_yaml(cfg, header), encoding="utf-8")
        replay = decided.pop("replay", None)
        if replay:
            write_jsonl(st.path(REPLAY_FILE), replay.pop("rows"))
        pref = decided.pop("preference", None)
        if pref:
            write_jsonl(st.path(PREFERENCE_FILE), pref["rows"])
            st.extra["preference_rows"] = {"file": PREFERENCE_FILE, "method": pref["method"], "pairs": pref["pairs"],
                                           "rows": len(pref["rows"])}
        launch = st.path("launch.sh")
        launch.write_text(P.launch_script(preset, str(r.out), name, seed=cfg.get("seed")), encoding="utf-8")
        launch.chmod(0o755)
        if preset.nodes > 1:
            st.path("slurm.sbatch").write_text(P.sbatch_script(preset, str(r.out), f"medilora-{spec.kind}"),
                                               encoding="utf-8")
        st.extra.update({
            "arch": "causal", "kind": spec.kind, "base_model": r.base_model, "adapter": r.mode != "full",
            "mode": r.mode, "preset": preset.to_dict(), "world_size": preset.world_size, "launcher": preset.launcher,
            "sequence_len": cfg.get("sequence_len"), "sample_packing": bool(cfg.get("sample_packing")),
            "token_stats": decided["token_stats"], "axolotl_warnings": warnings, "rl": cfg.get("rl"),
            "start": ({k: v for k, v in start.items() if k not in ("inputs", "inherit")} if start else None),
        })
        if replay:
            st.extra["replay"] = replay
    return st.result


def _write_seq2seq(spec: StageSpec) -> Artifact:
    if spec.kind != "sft":
        raise UserError("seq2seq stages are SFT stages", field="--arch")
    if spec.from_stage:
        raise UserError("--from is for causal stages", field="--from")
    if not spec.base_model:
        raise UserError("--base-model is required", field="--base-model")
    if spec.procs is not None:
        raise UserError("--procs is for causal (Axolotl) stages", field="--procs")
    if spec.device not in (None, "cpu") or spec.gpus or spec.nodes or spec.shard:
        raise UserError("the seq2seq recipes train in one process: no GPU preset", field="--device")
    # flat keys, as seq2seq.write_stage reads them (--qlora/--full are refused there with their reason)
    params = {**spec.options(), **({"adapter": spec.mode} if spec.mode in ("lora", "full") else {}),
              **({"load_in_4bit": True} if spec.mode == "qlora" else {}), **R.parse_set(list(spec.set_items))}
    return seq2seq.write_stage(spec.out, spec.base_model, list(spec.data), params, spec.force)
