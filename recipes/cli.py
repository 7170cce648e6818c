"""The recipes package's verbs: stage completion|sft, train, memory, plot (heavy imports inside)."""
from __future__ import annotations

from pathlib import Path

import click

from tools.cli_options import emit_json, force_option, json_option, out_option
from tools.errors import UserError

from .recipe import RL_METHODS

ADAPTER_FLAGS = ("qlora", "lora", "full")


def _common(f):
    opts = [
        out_option("Stage folder to write.", required=True, file_okay=False),
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
        click.option("--replay", default=None, type=click.Path(),
                     help="General data mixed in against forgetting: a corpus (completion) or dataset (sft) artifact, "
                          "e.g. `tools build-corpus general`."),
        click.option("--replay-ratio", type=float, default=None,
                     help="Share of the mixed training rows that are replay (default 0.1); seeded sample."),
        click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
                     help="Any Axolotl key (YAML value; dotted keys for nested); wins over everything."),
        force_option,
        json_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def check_stage_options(cmd: click.Command) -> None:
    """Every option of a stage verb is a StageSpec field (and every field but kind/arch is an option)."""
    from dataclasses import fields

    from .stage import StageSpec

    names = {p.name for p in cmd.params} - {"as_json"}
    names = {"data" if n in ("corpora", "datasets", "pairs") else n for n in names}
    spec = {f.name for f in fields(StageSpec)} - {"kind", "arch"}
    if cmd.name == "completion":
        spec -= {"from_stage", "merged"}
    if cmd.name != "dpo":
        spec -= {"method"}
    else:
        spec -= {"base_model"}
    if names - {"arch"} != spec:
        raise AssertionError(f"{cmd.name} options and StageSpec differ: {sorted(names ^ spec)}")


def _write(kind: str, as_json: bool, params: dict) -> None:
    from .stage import StageSpec, write_stage

    data = params.pop("corpora", None) or params.pop("datasets", None) or params.pop("pairs", None) or ()
    if params.get("target_modules") is not None:
        params["target_modules"] = tuple(t.strip() for t in params["target_modules"].split(",") if t.strip())
    spec = StageSpec(kind=kind, data=tuple(data), **{k: v for k, v in params.items()})
    _report(write_stage(spec), as_json)


def _report(art, as_json: bool) -> None:
    from tools.progress import out

    if as_json:
        return emit_json(art)
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
def stage_completion(as_json, **kw):
    """Stage one: continued pre-training (Axolotl `type: completion`) on corpora.

    \b
    Example:
      tools stage completion --base-model runs/base --corpus runs/corpus-textbooks --out runs/stage1
      tools stage completion --base-model HuggingFaceTB/SmolLM2-135M --corpus c1 --corpus c2 \\
          --gpus 4 --shard zero2 --epochs 1 --set learning_rate=1e-4 --out runs/stage1
    """
    _write("completion", as_json, kw)


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
def stage_sft(as_json, **kw):
    """Stage two: supervised fine-tuning on ChatML data, loss on assistant turns only.

    \b
    Example:
      tools stage sft --from runs/stage1 --dataset runs/pubmedqa-split --out runs/stage2
      tools stage sft --from runs/stage1 --merged runs/stage1-merged --dataset d --out runs/stage2
      tools stage sft --base-model runs/base --dataset d --device cpu --lora --max-steps 10 --out s
    """
    _write("sft", as_json, kw)


@click.command("dpo")
@click.option("--from", "from_stage", required=True, type=click.Path(),
              help="The trained SFT stage folder the preference stage starts from.")
@click.option("--merged", default=None, type=click.Path(),
              help="The SFT stage's `merge` artifact: a new adapter on it, so the reference model is the SFT model "
                   "(without it the SFT adapter is trained further and the reference is the SFT stage's base).")
@click.option("--pairs", "pairs", multiple=True, required=True, type=click.Path(),
              help="Preference pairs (`tools build-dataset pairs --bench RUN`); repeat for several.")
@click.option("--method", type=click.Choice(list(RL_METHODS)), default=None,
              help="Preference objective (default dpo); orpo and kto read the pairs rewritten in their layout; grpo is "
                   "written and checked, trained only with a vLLM server.")
@_common
def stage_dpo(as_json, **kw):
    """Preference tuning (Axolotl `rl: dpo`) on pairs from the model's own bench mistakes.

    \b
    Example:
      tools build-dataset pairs --bench runs/bench-dev --out runs/pairs
      tools stage dpo --from runs/stage2 --merged runs/merge2 --pairs runs/pairs --out runs/stage3
    """
    _write("dpo", as_json, kw)


@click.command("train")
@click.argument("stage_dir", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Print exactly what would run, run nothing.")
@force_option
@click.option("--restart", is_flag=True,
              help="Discard the checkpoints of an earlier killed or failed run and train from step 0.")
@click.option("--adopt", is_flag=True, help="Record an output/ written by launch.sh/sbatch as the artifact.")
@click.option("--select-by", default=None, metavar="TASK[:N]",
              help="Keep the checkpoint with the best dev accuracy (log-likelihood, bench's prompts): "
                   "pubmedqa-dev[:N], medqa-dev[:N] or an MCQ .jsonl of dev/train items (test items refused).")
@out_option("The trained artifact: STAGE_DIR/output, where merge, stage --from and card read it (the default; "
            "the only value accepted, so a pipeline can pass --out to every verb).")
@json_option
def train_cmd(stage_dir, dry_run, force, restart, adopt, select_by, out, as_json):
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
      tools train runs/stage2 --select-by pubmedqa-dev:200
    """
    from tools.progress import out as console

    from .selection import selector
    from .train import dry_run_lines, train_stage

    if out is not None and Path(out).resolve() != (Path(stage_dir) / "output").resolve():
        raise UserError(f"a stage's training output is STAGE_DIR/output ({Path(stage_dir) / 'output'})",
                        field="--out")
    res = train_stage(stage_dir, dry_run=dry_run, force=force, adopt=adopt, restart=restart,
                      select=selector(select_by))
    plan = res if isinstance(res, dict) else None  # --dry-run: the commands, no artifact
    if as_json:
        return emit_json(None if plan else res, plan)
    if plan:
        return click.echo("\n".join(dry_run_lines(plan)))
    console.print(f"train: {res.path}")
    for k in ("base_model", "adapter", "steps", "world_size", "resumed_from_step", "final_loss"):
        console.print(f"  {k}: {res.extra.get(k)}")
    sel = res.extra.get("selection")
    if sel:
        console.print(f"  chosen checkpoint ({sel['by']}): step {sel['chosen_step']} of "
                  + ", ".join(f"{p['step']}: {p['accuracy']:.3f}" for p in sel["checkpoints"]), markup=False)


@click.command("memory")
@click.argument("stage_dir", required=False, type=click.Path())
@click.option("--model", type=click.Path(), default=None, help="HF model folder (instead of a stage).")
@click.option("--batch", default=2, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--regime", "regimes", multiple=True, type=click.Choice(["full", "lora", "qlora"]),
              default=("full", "lora", "qlora"), show_default=True)
@click.option("--lora-r", default=None, type=int, help="Default: the stage's lora_r, else 8.")
@json_option
def memory_cmd(stage_dir, model, batch, seq_len, regimes, lora_r, as_json):
    """Trainable / frozen parameter MB and activation MB, measured for full, LoRA and QLoRA.

    Activation MB is measured: the bytes of the tensors autograd saves for backward during one
    forward pass of a batch (torch saved-tensor hooks), not an estimate.

    \b
    Example:  tools memory runs/sft-stage --batch 2 --seq-len 512
    """
    from .memory import measure_stage, memory_table

    rows = measure_stage(stage_dir, model, regimes=regimes, batch=batch, seq_len=seq_len, lora_r=lora_r)
    if as_json:
        return emit_json(None, rows)
    from tools.progress import out

    out.print(memory_table(rows, f"Memory footprint, batch {batch} x {seq_len} tokens (activations measured)"))


@click.command("plot")
@click.argument("stage_dir", type=click.Path(exists=True))
@click.option("--out", type=click.Path(), default=None, help="PNG path (default STAGE_DIR/loss.png).")
def plot_cmd(stage_dir, out):
    """Render train/eval loss curves from a trained stage's log history (and, after `tools train
    --select-by`, the dev accuracy of every checkpoint next to the loss).

    \b
    Example:  tools plot runs/sft-stage
    """
    from .logs import plot_stage

    out, info = plot_stage(stage_dir, out)
    sel = info.get("selection")
    chosen = f", chosen step {sel['chosen_step']} by {sel['by']}" if sel else ""
    click.echo(f"{out}  ({info['train_points']} train points, final loss {info['final_train_loss']}, "
               f"{info['eval_points']} eval points{chosen})")


def register(cli):
    from tools.cli import group

    stage = group("stage")
    for cmd in (stage_completion, stage_sft, stage_dpo):  # options checked against StageSpec in tests/tools/test_cli.py
        stage.add_command(cmd)
    for cmd in (train_cmd, memory_cmd, plot_cmd):
        cli.add_command(cmd)
