"""CLI: `tools eval perplexity`, `tools analyze errors`, `tools sweep`, `tools memory`, `tools plot`."""
from __future__ import annotations

import json

import click


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.table import Table

    from tools.progress import out

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    out.print(t)


@click.command("perplexity")
@click.option("--model", "models", multiple=True, required=True,
              help="HF model folder or GGUF file; repeat to compare (e.g. base and fine-tuned).")
@click.option("--data", required=True, type=click.Path(), help="SFT dataset artifact folder (or a ChatML JSONL).")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="First N items only.")
@click.option("--n-gpu-layers", type=int, default=None,
              help="GGUF layers to offload to the GPU (default: all when llama.cpp has a GPU backend, else 0).")
@click.option("--out", type=click.Path(), default=None, help="Artifact folder for the results.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--force", is_flag=True)
def perplexity_cmd(models, data, split, limit, n_gpu_layers, out, as_json, force):
    """Mean cross-entropy and perplexity over answer tokens only (prompt masked, as in training).

    \b
    Example:
      tools eval perplexity --model runs/base --model runs/sft/merged --data runs/pubmedqa --split test
    """
    from evals.perplexity import run_perplexity

    results = run_perplexity(list(models), data, split=split, limit=limit, out=out, force=force,
                             n_gpu_layers=n_gpu_layers)
    if as_json:
        click.echo(json.dumps(results, indent=2, sort_keys=True))
    else:
        _table(f"Loss / perplexity on {results[0]['n_items']} {split} items (answer tokens only)",
               ["model", "items", "answer tokens", "loss (mean CE)", "perplexity"],
               [[r["model"], r["n_items"], r["n_tokens"], r["mean_ce"], r["perplexity"]] for r in results])


@click.command("errors", help="Classify each prediction of a bench result as correct / underspecified / "
               "incorrect and plot the lengths of the incorrect ones.\n\n\b\nExample:\n"
               "  tools analyze errors runs/bench/pubmedqa-generate --out runs/errors\n\n\b\nRules:\n"
               + "\n".join("  " + ln.strip() for ln in __import__("evals.analysis", fromlist=["RULES"]).RULES.splitlines()))
@click.argument("results_dir", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="Artifact folder (default RESULTS_DIR/../<name>-errors).")
@click.option("--min-tokens", default=1, show_default=True, help="Outputs shorter than this are underspecified.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--force", is_flag=True)
def errors_cmd(results_dir, out, min_tokens, as_json, force):
    from evals.analysis import run_errors

    art = run_errors(results_dir, out, min_tokens=min_tokens, force=force)
    out = art.path
    res = json.loads((out / "errors.json").read_text())
    if as_json:
        click.echo(json.dumps({k: res[k] for k in ("n", "counts", "shares")}, indent=2, sort_keys=True))
    else:
        _table(f"Error classes ({res['n']} items)", ["class", "items", "share"],
               [[k, res["counts"][k], f"{res['shares'][k]:.1%}"] for k in res["counts"]])
        click.echo(f"report: {out / 'report.md'}  histogram: {out / 'incorrect_lengths.png'}")


@click.command("memory")
@click.argument("stage_dir", required=False, type=click.Path())
@click.option("--model", type=click.Path(), default=None, help="HF model folder (instead of a stage).")
@click.option("--batch", default=2, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--regime", "regimes", multiple=True, type=click.Choice(["full", "lora", "qlora"]),
              default=("full", "lora", "qlora"), show_default=True)
@click.option("--lora-r", default=None, type=int, help="Default: the stage's lora_r, else 8.")
@click.option("--json", "as_json", is_flag=True)
def memory_cmd(stage_dir, model, batch, seq_len, regimes, lora_r, as_json):
    """Trainable / frozen parameter MB and activation MB, measured for full, LoRA and QLoRA.

    Activation MB is measured: the bytes of the tensors autograd saves for backward during one
    forward pass of a batch (torch saved-tensor hooks), not an estimate.

    \b
    Example:  tools memory runs/sft-stage --batch 2 --seq-len 512
    """
    from recipes.memory import measure_stage

    rows = measure_stage(stage_dir, model, regimes=regimes, batch=batch, seq_len=seq_len, lora_r=lora_r)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _table(f"Memory footprint, batch {batch} x {seq_len} tokens (activations measured)",
               ["regime", "trainable MB", "frozen MB", "total param MB", "activation MB", "trainable params"],
               [[x["regime"], x["trainable_mb"], x["frozen_mb"], x["total_param_mb"], x["activation_mb"],
                 x["trainable_params"]] for x in rows])


@click.command("plot")
@click.argument("stage_dir", type=click.Path(exists=True))
@click.option("--out", type=click.Path(), default=None, help="PNG path (default STAGE_DIR/loss.png).")
def plot_cmd(stage_dir, out):
    """Render train/eval loss curves from a trained stage's log history.

    \b
    Example:  tools plot runs/sft-stage
    """
    from recipes.logs import plot_stage

    out, info = plot_stage(stage_dir, out)
    click.echo(f"{out}  ({info['train_points']} train points, final loss {info['final_train_loss']}, "
               f"{info['eval_points']} eval points)")


def register(cli):
    from tools.cli import group
    group("eval").add_command(perplexity_cmd)
    group("analyze").add_command(errors_cmd)
    cli.add_command(memory_cmd)
    cli.add_command(plot_cmd)
    from evals.paired import report_cmd
    cli.add_command(report_cmd)
    from evals.sweep_cli import sweep_cmd
    cli.add_command(sweep_cmd)
