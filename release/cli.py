"""Release verbs: merge, convert, quantize, imatrix, inspect, compare-quant, card, push, export, chat."""
from __future__ import annotations

from pathlib import Path

import click

from tools.cli_options import N_GPU_LAYERS_HELP, artifact_options, emit_json, json_option, read_results, threads_option


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.command("merge")
@click.argument("stage_dir", required=False, type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), help="Full-precision base model folder (peft merge).")
@click.option("--adapter", type=click.Path(path_type=Path), help="LoRA adapter folder (peft merge).")
@click.option("--dry-run", is_flag=True, help="Check the inputs and print what would run.")
@artifact_options("Merged model folder [STAGE_DIR/merged].", path_type=Path)
def merge_cmd(stage_dir, base, adapter, dry_run, out, force, as_json):
    """Merge a LoRA adapter into its base, saved in the base's dtype with tokenizer and chat template.

    \b
    tools merge runs/sft                       # axolotl merge-lora runs/sft/axolotl.yaml (4-bit bases too)
    tools merge --base BASE --adapter runs/sft/output --out runs/merged   # peft merge_and_unload
    """
    from release.merge import merge

    res = merge(stage_dir, base=base, adapter=adapter, out=out, force=force, dry_run=dry_run)
    if as_json:
        return emit_json(None, res) if dry_run else emit_json(res)
    if dry_run:
        return click.echo(f"would merge ({res['method']}, {res['dtype']}) into {res['out']}"
                          + (f": {' '.join(res['command'])}" if "command" in res else ""))
    click.echo(f"merged ({res.extra.get('method')}, {res.extra.get('dtype')}) -> {res.path}")


@click.command("convert")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32", "q8_0"]), default="f16", show_default=True)
@click.option("--name", help="What the model is (GGUF general.name / basename) [MediLoRA <base model>].")
@click.option("--lora", is_flag=True, help="MODEL_DIR is a LoRA adapter: write it as a GGUF adapter (needs --base).")
@click.option("--base", type=click.Path(path_type=Path), help="With --lora: the HF base model folder it was trained on.")
@click.option("--fidelity-tokens", type=int, default=256, show_default=True,
              help="Held-out tokens for the HF-vs-GGUF fidelity gate (0 skips it).")
@click.option("--max-kl", type=float, default=None, help="Fidelity gate: largest mean KL(HF || GGUF) [0.01 for f16].")
@click.option("--min-top1", type=float, default=0.9, show_default=True, help="Fidelity gate: smallest top-1 agreement.")
@artifact_options("GGUF artifact folder [MODEL_DIR-OUTTYPE].", path_type=Path)
def convert_cmd(model_dir, outtype, out, name, lora, base, fidelity_tokens, max_kl, min_top1, force, as_json):
    """HF model folder -> GGUF with llama.cpp's own converter (chat template included), then a fidelity
    gate: the GGUF's next-token distributions must match the HF model's (transformers, float32).

    \b
    tools convert runs/merged --outtype f16 --out runs/gguf-f16 --name "MediLoRA SmolLM2 135M"
    tools convert runs/sft/output --lora --base runs/merge1 --out runs/lora-gguf
    """
    from release.convert import Gate, convert_model, summary_lines

    art = convert_model(model_dir, outtype, out, name=name, lora=lora, base=base,
                        gate=Gate(tokens=fidelity_tokens, max_kl=max_kl, min_top1=min_top1), force=force)
    if as_json:
        return emit_json(art)
    click.echo("\n".join(summary_lines(art)))


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--q", "qtype", default="Q3_K_L", show_default=True,
              help="Any llama.cpp type name (Q4_K_M, IQ4_XS, ...); several, comma-separated, give one GGUF each + a table.")
@click.option("--budget", multiple=True, help="Instead of --q: the smallest candidate within this quality budget, "
              "kl=NATS (mean KL vs MODEL on held-out text) and/or acc-drop=POINTS (accuracy lost vs MODEL on dev "
              "items, upper end of the paired 95 % interval); see release/budget.py, evals/accdrop.py.")
@click.option("--budget-data", metavar="TASK-dev[:N]|FILE.jsonl[:N]",
              help="acc-drop: the dev items, pubmedqa-dev[:N], medqa-dev[:N] or an MCQ JSONL (test items refused) "
              "[pubmedqa-dev, 500 items].")
@click.option("--max-size", help="Budget: the file may be at most this large (90M, 2G, bytes).")
@click.option("--max-ram", help="Budget: weights + KV cache at --ctx tokens may need at most this much (4G).")
@click.option("--types", help="Budget: stock types to search from, comma-separated [all llama.cpp k/legacy types; "
              "IQ types too with --imatrix].")
@click.option("--mix-bases", help="Budget: stock types the mixes are built around, comma-separated [all searched].")
@click.option("--measure-all", is_flag=True, help="Budget: measure every candidate (no skipping), for the full front.")
@click.option("--min-tokens", type=int, default=4096, show_default=True, help="Budget: held-out tokens scored.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Importance matrix: a file (GGUF or legacy .dat) or a `tools imatrix` artifact.")
@click.option("--name", help="Output file name (default: <BaseName>-<SizeLabel>-<FineTune>-<Type>.gguf).")
@click.option("--allow-requantize", is_flag=True, help="Quantize an already-quantized file (loses quality).")
@threads_option
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="Several types / budget: held-out text for the table [PubMedQA test abstracts].")
@click.option("--ctx", type=int, default=None, help="Several types: window size for the table's PPL/KL [256]; "
              "budget: the context --max-ram is judged at [4096].")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Several types: tokens scored.")
@click.option("--split-max-size", help="Cut each GGUF into llama.cpp gguf-split shards of at most this much tensor "
              "data (50G, 500M, bytes); NAME-00001-of-0000N.gguf, load the first.")
@artifact_options("GGUF artifact folder [beside MODEL, named by type].", path_type=Path)
def quantize_cmd(model, qtype, budget, budget_data, max_size, max_ram, types, mix_bases, measure_all, min_tokens, imatrix,
                 out, name, allow_requantize, threads, text_file, ctx, max_tokens, split_max_size, force, as_json):
    """Quantize a GGUF in-process with llama.cpp; report the real tensor-type mix and bits per weight.

    \b
    tools quantize runs/gguf-f16 --q Q3_K_L --out runs/gguf-q3kl
    tools quantize model-F16.gguf --q Q4_K_M --imatrix imatrix.gguf
    tools quantize runs/gguf-f16 --q Q3_K_L,Q4_K_M,Q8_0 --out runs/gguf-set   # one GGUF per type + table
    tools quantize runs/gguf-f16 --q IQ3_XXS --imatrix runs/imatrix --split-max-size 2G
    tools quantize runs/gguf-f16 --budget kl=0.05 --max-ram 4G --ctx 4096 --out runs/gguf-fit
    tools quantize runs/gguf-f16 --budget acc-drop=2 --budget kl=0.1 --budget-data pubmedqa-dev:200
    """
    from release.ggufinfo import parse_size
    from release.quantgap import Scoring
    from release.quantize import QuantOptions, default_out, quantize_many, summary_lines, warning_for

    if budget or max_size or max_ram or budget_data:
        from release import budget as qb

        names = lambda s: tuple(t.strip().upper() for t in s.split(",") if t.strip()) if s else None  # noqa: E731
        spec = qb.SearchSpec(qb.parse_budget(budget, max_size, max_ram, ctx or 4096), types=names(types),
                             imatrix=imatrix, text_file=text_file, min_tokens=min_tokens, threads=threads,
                             measure_all=measure_all, mix_bases=names(mix_bases), acc_data=budget_data)
        art = qb.quantize_budget(model, out or default_out(model, "budget"), spec, force=force)
        if as_json:
            return emit_json(art, read_results(art, "candidates.json"))
        return click.echo("\n".join(qb.summary_lines(art)))
    opts = QuantOptions(imatrix=imatrix, allow_requantize=allow_requantize, threads=threads, name=name,
                        split_max_size=parse_size(split_max_size) if split_max_size is not None else None)
    art = quantize_many(model, qtype, out, opts, Scoring(ctx=ctx or 256, max_tokens=max_tokens, threads=threads),
                        text_file=text_file, force=force)
    warn = warning_for(art.extra) if art.stage == "gguf" else None
    if warn:
        click.echo(warn, err=True)
    if as_json:
        return emit_json(art, read_results(art, "quant-table.json"))
    click.echo("\n".join(summary_lines(art)))


@click.command("imatrix")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--corpus", required=True, type=click.Path(path_type=Path), help="Corpus artifact (tools build-corpus).")
@click.option("--chunks", type=int, help="Chunks of --ctx tokens to run [all the corpus holds].")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk (llama-imatrix's -c).")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix --process-output).")
@threads_option
@click.option("--n-gpu-layers", type=int, default=None, help=N_GPU_LAYERS_HELP)
@artifact_options("Imatrix artifact folder [beside MODEL, -imatrix].", path_type=Path)
def imatrix_cmd(model, corpus, chunks, ctx, process_output, threads, n_gpu_layers, out, force, as_json):
    """Importance matrix of a GGUF on our own domain text, computed in-process through llama.cpp (its
    llama-imatrix format); quantize with it: tools quantize F16 --q IQ3_XXS --imatrix OUT. Its lineage is
    the corpus's: computed from MIMIC text it is credentialed and push refuses it.

    \b
    tools imatrix runs/gguf-f16 --corpus runs/corpus-notes --chunks 100 --out runs/imatrix
    """
    from release.imatrix import ImatrixRun, imatrix_stage
    from release.quantize import default_out

    art = imatrix_stage(model, corpus, out or default_out(model, "imatrix"),
                        ImatrixRun(chunks=chunks, ctx=ctx, process_output=process_output, threads=threads,
                                   n_gpu_layers=n_gpu_layers), force=force)
    e = art.extra
    if as_json:
        return emit_json(art)
    click.echo(f"{art.path / e['file']}  {e['entries']} weights, {e['chunks']} chunks x {e['ctx']} tokens"
               f"{'  (credentialed: never leaves this machine)' if art.lineage.credentialed else ''}")


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--tensors", is_flag=True, help="List every tensor.")
@json_option
def inspect_cmd(model, tensors, as_json):
    """Architecture, file type, tensor-type histogram, chat template and metadata of a GGUF.

    \b
    tools inspect runs/gguf-q3kl/MediLoRA-135M-Q3_K_L.gguf
    """
    from release.ggufinfo import describe_lines, read_gguf
    from tools.ggufpath import resolve_gguf

    info = read_gguf(resolve_gguf(model))
    if not tensors:
        info.pop("tensors", None)
    if as_json:
        return emit_json(None, info)
    click.echo("\n".join(describe_lines(info)))


@click.command("compare-quant")
@click.option("--ref", required=True, type=click.Path(path_type=Path), help="Reference GGUF (f16/bf16/f32).")
@click.option("--quant", required=True, type=click.Path(path_type=Path), help="Quantized GGUF.")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="UTF-8 text to score.")
@click.option("--ctx", default=512, show_default=True, help="Window size in tokens.")
@click.option("--max-tokens", type=int, help="Score only the first N tokens.")
@threads_option
@click.option("--n-gpu-layers", type=int, default=None, help=N_GPU_LAYERS_HELP)
@artifact_options("Result artifact folder.", out_required=True, path_type=Path)
def compare_quant_cmd(ref, quant, text_file, ctx, max_tokens, threads, n_gpu_layers, out, force, as_json):
    """Quantization gap: perplexity of both GGUFs and mean KL(ref || quant) on the same tokens.

    \b
    tools compare-quant --ref runs/gguf-f16 --quant runs/gguf-q3kl --text notes.txt --out runs/qgap
    """
    from release.quantgap import Scoring, compare_quant
    from tools.ggufpath import resolve_gguf

    art = compare_quant(resolve_gguf(ref, "--ref"), resolve_gguf(quant, "--quant"), text_file, out,
                        Scoring(ctx=ctx, max_tokens=max_tokens, threads=threads, n_gpu_layers=n_gpu_layers), force=force)
    res = read_results(art)
    if as_json:
        return emit_json(art, res)
    click.echo(f"perplexity {res['ref']['file_type']} {res['ref']['perplexity']:.4f} -> {res['quant']['file_type']} "
               f"{res['quant']['perplexity']:.4f} ({res['perplexity_delta_pct']:+.2f}%)")
    click.echo(f"mean KL {res['mean_kl']:.6f} nats, top-1 agreement {100 * res['top1_agreement']:.1f}%, "
               f"{res['tokens_scored']} tokens; plot {art.path / 'kl.png'}")


@click.command("card")
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--repo-id", help="ORG/NAME the card is for.")
@click.option("--license", "license_", help="License id [from the lineage when it names one].")
@click.option("--base-model", help="Hub id of the base model [from the manifests].")
@click.option("--dataset", "datasets", multiple=True, help="Hub dataset id trained on (repeatable).")
@click.option("--acknowledge-credentialed-training", "ack", is_flag=True,
              help="State that the model was trained on credentialed data and may be shared.")
@artifact_options("Card artifact folder (README.md).", out_required=True, path_type=Path)
def card_cmd(artifacts, repo_id, license_, base_model, datasets, ack, out, force, as_json):
    """Write the model card from manifests and eval results (model-index, quantization gap, lineage).

    \b
    tools card runs/sft/output runs/gguf-q3kl runs/bench-pubmedqa runs/qgap --repo-id org/medilora --out runs/card
    """
    from release.card import build_card

    art = build_card(artifacts, out, repo_id=repo_id, license=license_, base_model=base_model,
                     datasets=tuple(datasets), acknowledge_credentialed=ack, force=force)
    if as_json:
        return emit_json(art)
    click.echo(f"card -> {art.path / 'README.md'} ({art.extra['eval_results']} eval results)")


@click.command("push")
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="ORG/NAME on the Hub.")
@click.option("--private", is_flag=True)
@click.option("--revision", default="main", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print what would be uploaded; touch nothing.")
@click.option("--acknowledge-credentialed-training", "ack", is_flag=True,
              help="Allow a model trained on credentialed data (the card must state it too).")
@json_option
def push_cmd(artifacts, repo_id, private, revision, dry_run, ack, as_json):
    """Upload adapter, GGUF files and card (create_repo + upload_folder); token from HF_TOKEN or HF login.

    \b
    tools push runs/sft/output runs/gguf-q3kl runs/card --repo-id org/medilora --dry-run
    """
    from release.push import push

    res = push(artifacts, repo_id, private=private, dry_run=dry_run, revision=revision,
               acknowledge_credentialed=ack)
    if as_json:
        return emit_json(None, res)
    head = "would upload" if dry_run else "uploaded"
    click.echo(f"{head} to {repo_id} ({'private' if private else 'public'}, {revision}):")
    for f in res["files"]:
        click.echo(f"  {f['path']}  {_mib(f['size'])}")
    if not dry_run:
        click.echo(f"commit: {res['commit_url']}")


@click.group("export")
def export_group():
    """Hand a GGUF to laptop runtimes: an Ollama Modelfile folder, an LM Studio folder."""


@export_group.command("ollama")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", help="Ollama model name for the README [from the GGUF file name].")
@click.option("--system", help="System prompt [the MediLoRA prompt of --system-task].")
@click.option("--system-task", type=click.Choice(["pubmedqa", "medqa"]), default="pubmedqa", show_default=True)
@click.option("--adapter", type=click.Path(path_type=Path), help="A LoRA adapter GGUF (tools convert --lora) to apply.")
@click.option("--ram", help="Set num_ctx to the largest context whose weights + KV cache fit in this much memory (8G).")
@artifact_options("Export folder (Modelfile, GGUF, README).", out_required=True, path_type=Path)
def export_ollama_cmd(model, name, system, system_task, adapter, ram, out, force, as_json):
    """Modelfile with FROM, TEMPLATE (the GGUF's chat template in Go syntax), SYSTEM, PARAMETER lines.

    \b
    tools export ollama runs/gguf-q3kl --out runs/ollama && cd runs/ollama && ollama create medilora -f Modelfile
    """
    from release.export import export_ollama

    art = export_ollama(model, out, name=name, system=system, system_task=system_task, adapter=adapter, ram=ram,
                      force=force)
    if as_json:
        return emit_json(art)
    click.echo(f"{art.path / 'Modelfile'}  (ollama create {art.extra['name']} -f Modelfile)")


@export_group.command("lmstudio")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--publisher", default="medilora", show_default=True)
@click.option("--name", help="Model folder name [<file stem>-GGUF].")
@artifact_options("Export folder (PUBLISHER/MODEL/file.gguf).", out_required=True, path_type=Path)
def export_lmstudio_cmd(model, publisher, name, out, force, as_json):
    """LM Studio's models layout: PUBLISHER/MODEL/file.gguf (copy it into ~/.lmstudio/models).

    \b
    Example:  tools export lmstudio runs/demo/q3kl --out runs/lmstudio --publisher my-lab
    """
    from release.export import export_lmstudio

    art = export_lmstudio(model, out, publisher=publisher, name=name, force=force)
    if as_json:
        return emit_json(art)
    click.echo(str(art.path / art.extra["file"]))


@click.command("chat")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--once", help="Answer this one message and exit (for scripts).")
@click.option("--system", help="System prompt [the MediLoRA prompt of --system-task].")
@click.option("--system-task", type=click.Choice(["pubmedqa", "medqa"]), default="pubmedqa", show_default=True)
@click.option("--max-tokens", type=int, default=512, show_default=True, help="New tokens per reply at most.")
@click.option("--temperature", type=float, default=None, help="Default 0.8 (the protocol's).")
@click.option("--top-k", type=int, default=None, help="Default 40 (the protocol's).")
@click.option("--top-p", type=float, default=None, help="Default 0.95.")
@click.option("--min-p", type=float, default=None, help="Default 0.05.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-ctx", type=int, default=4096, show_default=True)
@threads_option
@click.option("--n-gpu-layers", type=int, default=None, help=N_GPU_LAYERS_HELP)
def chat_cmd(model, once, system, system_task, max_tokens, temperature, top_k, top_p, min_p, seed, n_ctx, threads,
             n_gpu_layers):
    """Chat with a GGUF in the terminal (its chat template, the MediLoRA system prompt, top-k 40).

    \b
    tools chat runs/gguf-q3kl              # /reset, /system TEXT, /exit
    tools chat model.gguf --once "What is metformin used for?"
    """
    from release.chat import ChatSpec, chat_main

    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    raise SystemExit(chat_main(ChatSpec(model, system=system, system_task=system_task, once=once, sampling=sampling,
                                        max_tokens=max_tokens, n_ctx=n_ctx, seed=seed, threads=threads,
                                        n_gpu_layers=n_gpu_layers)))


def register(cli: click.Group) -> None:
    for cmd in (merge_cmd, convert_cmd, quantize_cmd, imatrix_cmd, inspect_cmd, compare_quant_cmd, card_cmd, push_cmd,
                export_group, chat_cmd):
        cli.add_command(cmd)
