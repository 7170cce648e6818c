"""CLI: `tools stage completion`, `tools stage sft` and `tools train` (heavy imports inside)."""
from __future__ import annotations

import json

import click

ADAPTER_FLAGS = ("qlora", "lora", "full")


def _common(f):
    opts = [
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Stage folder to write."),
        click.option("--device", type=click.Choice(["gpu", "cpu"]), default=None,
                     help="gpu (default) or cpu: the CPU profile for small local runs."),
        click.option("--gpus", type=int, default=None, help="GPUs per node (default 1)."),
        click.option("--procs", type=int, default=None,
                     help="Processes per node (default: --gpus on GPU, 1 on CPU; >1 on CPU trains DDP over gloo)."),
        click.option("--nodes", type=int, default=None, help="Nodes (default 1; >1 writes torchrun rendezvous + sbatch)."),
        click.option("--shard", type=click.Choice(["none", "zero1", "zero2", "zero3", "fsdp2"]), default=None,
                     help="Sharding (default: none on 1 GPU, zero2 on several)."),
        click.option("--qlora", "mode", flag_value="qlora", default=None, help="4-bit base + LoRA (default)."),
        click.option("--lora", "mode", flag_value="lora", help="LoRA on an unquantized base."),
        click.option("--full", "mode", flag_value="full", help="Full fine-tune (no adapter)."),
        click.option("--lora-r", type=int, default=None, help="LoRA rank (default 8)."),
        click.option("--lora-alpha", type=int, default=None, help="LoRA alpha (default 16)."),
        click.option("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0.05)."),
        click.option("--target", "target_modules", default=None,
                     help="LoRA target modules, comma-separated (default q_proj,v_proj)."),
        click.option("--epochs", type=float, default=None, help="Epochs (default 2)."),
        click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps."),
        click.option("--lr", type=float, default=None, help="Learning rate (default 2e-4)."),
        click.option("--seq-len", type=int, default=None, help="Sequence length (default: from the data)."),
        click.option("--micro-batch", type=int, default=None, help="Micro batch size (default 2)."),
        click.option("--grad-accum", type=int, default=None, help="Gradient accumulation (default 4)."),
        click.option("--warmup-steps", type=int, default=None, help="Warm-up steps (default 100)."),
        click.option("--packing/--no-packing", default=None, help="Sample packing (default: from the data)."),
        click.option("--seed", type=int, default=None, help="Seed (default 42)."),
        click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
                     help="Any Axolotl key (YAML value; dotted keys for nested); wins over everything."),
        click.option("--force", is_flag=True, help="Re-write even if up to date."),
        click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _options(kw: dict) -> dict:
    names = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "epochs", "max_steps", "lr", "seq_len",
             "micro_batch", "grad_accum", "warmup_steps", "packing", "seed")
    opts = {k: kw.pop(k) for k in names}
    if opts["target_modules"] is not None:
        opts["target_modules"] = [t.strip() for t in opts["target_modules"].split(",") if t.strip()]
    if opts["epochs"] is not None and float(opts["epochs"]).is_integer():
        opts["epochs"] = int(opts["epochs"])
    return opts


def _check_device(device, gpus) -> None:
    if device == "cpu" and gpus is not None:
        from tools.errors import UserError
        raise UserError("--device cpu has no GPUs: ask for several processes with --procs N", field="--gpus")


def _report(art, as_json: bool) -> None:
    from tools.progress import out

    if as_json:
        click.echo(json.dumps({"path": str(art.path), **art.manifest}, indent=2, sort_keys=True))
        return
    e = art.extra
    out.print(f"{art.stage}: {art.path}")
    for k in ("base_model", "mode", "launcher", "world_size", "sequence_len", "sample_packing"):
        if k in e:
            out.print(f"  {k}: {e[k]}")


@click.command("completion")
@click.option("--base-model", required=True, help="HF model folder or Hub id.")
@click.option("--corpus", "corpora", multiple=True, required=True, type=click.Path(),
              help="Corpus artifact folder (corpus.jsonl); repeat for several.")
@_common
def stage_completion(base_model, corpora, out, device, gpus, procs, nodes, shard, mode, set_items, force, as_json,
                     **kw):
    """Stage one: continued pre-training (Axolotl `type: completion`) on corpora.

    \b
    Example:
      tools stage completion --base-model runs/base --corpus runs/corpus-textbooks --out runs/stage1
      tools stage completion --base-model HuggingFaceTB/SmolLM2-135M --corpus c1 --corpus c2 \\
          --gpus 4 --shard zero2 --epochs 1 --set learning_rate=1e-4 --out runs/stage1
    """
    from .stage import write_stage

    _check_device(device, gpus)
    art = write_stage("completion", out, base_model=base_model, data=list(corpora), device=device, gpus=gpus,
                      nodes=nodes, shard=shard, mode=mode, options=_options(kw), set_items=set_items, force=force,
                      procs=procs)
    _report(art, as_json)


@click.command("sft")
@click.option("--base-model", default=None, help="HF model folder or Hub id (or use --from).")
@click.option("--from", "from_stage", default=None, type=click.Path(),
              help="Stage one's folder (trained): start from its output, named by its manifest.")
@click.option("--merged", default=None, type=click.Path(),
              help="With --from: stage one's `merge` artifact; SFT trains a new adapter on it.")
@click.option("--dataset", "datasets", multiple=True, required=True, type=click.Path(),
              help="ChatML dataset artifact folder (train.jsonl [+ validation.jsonl]); repeat for several.")
@click.option("--arch", type=click.Choice(["causal", "seq2seq"]), default="causal", show_default=True,
              help="causal (Axolotl) or seq2seq (the seq2seq recipes).")
@_common
def stage_sft(base_model, from_stage, merged, datasets, arch, out, device, gpus, procs, nodes, shard, mode, set_items,
              force, as_json, **kw):
    """Stage two: supervised fine-tuning on ChatML data, loss on assistant turns only.

    \b
    Example:
      tools stage sft --from runs/stage1 --dataset runs/pubmedqa-split --out runs/stage2
      tools stage sft --from runs/stage1 --merged runs/stage1-merged --dataset d --out runs/stage2
      tools stage sft --base-model runs/base --dataset d --device cpu --lora --max-steps 10 --out s
    """
    opts = _options(kw)
    if arch == "seq2seq":
        from tools.errors import UserError
        try:
            from . import seq2seq
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith("seq2seq"):
                raise UserError("seq2seq recipes are not installed (recipes/seq2seq.py)", field="--arch") from None
            raise
        if from_stage:
            raise UserError("--from is for causal stages", field="--from")
        if not base_model:
            raise UserError("--base-model is required", field="--base-model")
        if procs is not None:
            raise UserError("--procs is for causal (Axolotl) stages", field="--procs")
        params = {"device": device, "gpus": gpus, "nodes": nodes, "shard": shard, "mode": mode, "options": opts,
                  "set": list(set_items)}
        art = seq2seq.write_stage(out, base_model, list(datasets), params, force)
        _report(art, as_json)
        return
    from .stage import write_stage

    _check_device(device, gpus)
    art = write_stage("sft", out, base_model=base_model, data=list(datasets), from_stage=from_stage, merged=merged,
                      device=device, gpus=gpus, nodes=nodes, shard=shard, mode=mode, options=opts,
                      set_items=set_items, force=force, procs=procs)
    _report(art, as_json)


@click.command("train")
@click.argument("stage_dir", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Print exactly what would run, run nothing.")
@click.option("--force", is_flag=True, help="Train again even if output/ is up to date.")
@click.option("--restart", is_flag=True,
              help="Discard the checkpoints of an earlier killed or failed run and train from step 0.")
@click.option("--adopt", is_flag=True, help="Record an output/ written by launch.sh/sbatch as the artifact.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def train_cmd(stage_dir, dry_run, force, restart, adopt, as_json):
    """Run Axolotl on a stage folder: preprocess, then train; output/ becomes an artifact.

    Checkpoints live in STAGE_DIR/checkpoints (mode 0700) while training. A run that failed or was
    killed keeps them, and running `tools train` again resumes from the last complete checkpoint
    ("resuming from step N"); --restart starts over. Several processes (tools stage --procs N)
    run through the stage's launcher; a stage of several nodes runs launch.sh on each node.

    \b
    Example:
      tools train runs/stage1 --dry-run
      tools train runs/stage1
      tools train runs/stage1 --restart
    """
    import shlex

    from tools.progress import out

    from .train import train_stage

    res = train_stage(stage_dir, dry_run=dry_run, force=force, adopt=adopt, restart=restart)
    if isinstance(res, dict):
        if as_json:
            click.echo(json.dumps(res, indent=2, sort_keys=True))
            return
        out.print(f"# {res.get('stage')} {res.get('stage_dir')} -> {res.get('output')} (log {res.get('log')})")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in res.get("env", {}).items())
        for cmd in res["commands"]:
            out.print(f"PATH={shlex.quote(res['path_prepend'])}:$PATH {env} {shlex.join(cmd)}")
        return
    if as_json:
        click.echo(json.dumps({"path": str(res.path), **res.manifest}, indent=2, sort_keys=True))
        return
    e = res.extra
    out.print(f"train: {res.path}")
    for k in ("base_model", "adapter", "steps", "world_size", "resumed_from_step", "final_loss"):
        out.print(f"  {k}: {e.get(k)}")


def register(cli):
    from tools.cli import group

    stage = group("stage")
    stage.add_command(stage_completion)
    stage.add_command(stage_sft)
    cli.add_command(train_cmd)
