"""CLI verbs: `tools bench pubmedqa|medqa` and `tools eval mmlu-medical` (heavy imports stay inside)."""
from __future__ import annotations

import json

import click


def _bench_options(f):
    opts = [
        click.option("--model", "model", type=click.Path(), default=None,
                     help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)."),
        click.option("--data", type=click.Path(), default=None,
                     help="Items JSONL (raw as shipped, or normalized {id,question,context,options,answer})."),
        click.option("--split", type=click.Choice(["test", "dev"]), default="test", show_default=True,
                     help="Bundled split (ignored with --data)."),
        click.option("--limit", type=int, default=None, help="Only the first N items."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--threads", type=int, default=None, help="llama.cpp threads (default: all physical cores)."),
        click.option("--n-gpu-layers", type=int, default=None,
                     help="Layers to offload to the GPU (default: all when llama.cpp has a GPU backend, else 0)."),
        click.option("--lora", type=click.Path(), default=None,
                     help="LoRA adapter GGUF (tools convert --lora) applied to --model."),
        click.option("--mode", type=click.Choice(["generate", "loglik"]), default="generate", show_default=True,
                     help="generate: sample an answer and parse it; loglik: score every option."),
        click.option("--full-answer", is_flag=True, help="Keep generating after the answer is decided."),
        click.option("--max-tokens", type=int, default=None, help="New tokens at most (default 16; 256 with --cot)."),
        click.option("--temperature", type=float, default=None, help="Default 0.8 (llama-cpp-python's)."),
        click.option("--top-k", type=int, default=None, help="Default 40 (the protocol)."),
        click.option("--top-p", type=float, default=None, help="Default 0.95."),
        click.option("--min-p", type=float, default=None, help="Default 0.05."),
        click.option("--repeat-penalty", type=float, default=None, help="Default 1.0."),
        click.option("--n-ctx", type=int, default=4096, show_default=True),
        click.option("--rag", "rag", type=click.Path(), default=None, help="RAG index folder (tools rag index)."),
        click.option("--k", "k", type=int, default=6, show_default=True, help="Chunks to retrieve with --rag."),
        click.option("--shots", type=int, default=0, show_default=True,
                     help="K examples from the dev split as prior chat turns (seeded; stratified for yes/no/maybe)."),
        click.option("--dev", type=click.Path(), default=None,
                     help="Where --shots examples come from (default: the bundled dev split)."),
        click.option("--cot", is_flag=True, help="Ask for reasoning, then a final 'Answer: X' line."),
        click.option("--samples", type=int, default=1, show_default=True,
                     help="Draw N answers per item from one prompt evaluation and take the majority."),
        click.option("--out", type=click.Path(), default=None, help="Output folder (default runs/bench/...)."),
        click.option("--force", is_flag=True, help="Re-run even if the same run exists."),
        click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def bench_kwargs(model, data, split, limit, seed, threads, n_gpu_layers, mode, full_answer, max_tokens, temperature,
                 top_k, top_p, min_p, repeat_penalty, n_ctx, rag, k, shots, dev, cot, samples, out, force,
                 field_map=None, lora=None, **_) -> dict:
    """run_bench's keywords from the bench verbs' options (also used by `tools sweep --eval`)."""
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                "repeat_penalty": repeat_penalty}
    return dict(model=model, data=data, split=split, limit=limit, seed=seed, threads=threads, mode=mode,
                n_gpu_layers=n_gpu_layers, full_answer=full_answer, max_tokens=max_tokens, sampling=sampling,
                out=out, force=force, rag=rag, k=k, n_ctx=n_ctx, shots=shots, dev=dev, cot=cot, samples=samples,
                field_map=field_map, lora=lora)


def _run(task, as_json, **kw):
    from tools.progress import out as stdout

    from .bench import run_bench
    mode = kw["mode"]
    art = run_bench(task, **bench_kwargs(**kw))
    res = json.loads((art.path / "results.json").read_text(encoding="utf-8"))
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True))
        return
    t = art.extra.get("timing", {})

    def ci(key):
        v = res.get(key)
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""
    line = (f"{task} {mode}: n={res['n']} accuracy={res['accuracy']:.3f}{ci('accuracy_ci95')} "
            f"valid={res['valid_rate']:.3f}{ci('valid_rate_ci95')} macro_f1={res['macro_f1']:.3f}{ci('macro_f1_ci95')}")
    if mode == "loglik":
        line += f" accuracy_norm={res['accuracy_norm']:.3f}"
    if t:
        line += f" ({t.get('s_per_item')} s/item)"
    stdout.print(line, markup=False)
    sc = res.get("self_consistency")
    if sc:
        stdout.print(f"self-consistency: {sc['samples']} samples an item, {sc['ties']} tied votes", markup=False)
    stdout.print(f"artifact: {art.path} (brackets: 95 % intervals)", markup=False)


@click.command("pubmedqa")
@_bench_options
def bench_pubmedqa(**kw):
    """PubMedQA (official 500 test ids) on a GGUF.

    \b
    Example:
      tools bench pubmedqa --limit 40
      tools bench pubmedqa --model out/model.Q3_K_L.gguf --mode loglik --out runs/bench/pqa
    """
    _run("pubmedqa", **kw)


@click.command("medqa")
@_bench_options
def bench_medqa(**kw):
    """MedQA (USMLE, 4 options) on a GGUF.

    \b
    Example:
      tools bench medqa --limit 50 --mode loglik
    """
    _run("medqa", **kw)


@click.command("mcq")
@_bench_options
@click.option("--map", "maps", multiple=True,
              help="Rename fields: TARGET=SOURCE (targets id, question, options, answer, context); "
                   "options=a+b+c+d gathers several fields.")
def bench_mcq(maps, **kw):
    """Any multiple-choice or yes/no/maybe JSONL (--data), under the same protocol and reports.

    A row: question, options (list -> A, B, C...; or {label: text}), answer (label, option text or
    0-based index), optional context and id. Yes/no/maybe sets are asked like PubMedQA, others like MedQA.

    \b
    Example:
      tools bench mcq --data exam.jsonl --mode loglik
      tools bench mcq --data medmcqa.jsonl --map options=opa+opb+opc+opd --map answer=cop --limit 100
      tools bench mcq --data exam.jsonl --dev exam-dev.jsonl --shots 3 --cot --samples 5
    """
    from .mcq import parse_map
    _run("mcq", field_map=parse_map(maps), **kw)


@click.command("mmlu-medical")
@click.option("--model", "model", type=click.Path(), default=None,
              help="HF model folder or GGUF file (default: the embedded SmolLM2 GGUF).")
@click.option("--shots", type=click.Choice(["0", "5"]), default="0", show_default=True)
@click.option("--subjects", default=None, help="Comma-separated subset of the nine subjects.")
@click.option("--limit", type=int, default=None, help="Only the first N questions of each subject.")
@click.option("--threads", type=int, default=None, help="llama.cpp threads for a GGUF (default: physical cores).")
@click.option("--n-gpu-layers", type=int, default=None,
              help="Layers to offload to the GPU (default: all when llama.cpp has a GPU backend, else 0).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="lm-eval batch size (HF models).")
@click.option("--out", type=click.Path(), default=None, help="Output folder (default runs/eval/mmlu-medical-...).")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def eval_mmlu(model, shots, subjects, limit, threads, n_gpu_layers, batch_size, out, force, as_json):
    """MMLU-medical (nine subjects) through lm-eval with local task files (no Hub).

    \b
    Example:
      tools eval mmlu-medical --limit 20
      tools eval mmlu-medical --model runs/merge --shots 5
    """
    from tools.progress import out as stdout

    from .mmlu import run_mmlu
    subj = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    art = run_mmlu(model=model, shots=int(shots), subjects=subj, limit=limit, threads=threads,
                   n_gpu_layers=n_gpu_layers, batch_size=batch_size, out=out, force=force)
    res = json.loads((art.path / "results.json").read_text(encoding="utf-8"))
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True))
        return
    for s, v in res["subjects"].items():
        stdout.print(f"{s:24s} {v['n']:5d}  {100 * v['accuracy']:5.1f}%", markup=False)
    stdout.print(f"{'average (macro)':24s} {res['n']:5d}  {100 * res['accuracy_macro']:5.1f}%", markup=False)
    stdout.print(f"artifact: {art.path}", markup=False)


def register(cli):
    from tools.cli import group
    group("bench").add_command(bench_pubmedqa)
    group("bench").add_command(bench_medqa)
    group("bench").add_command(bench_mcq)
    group("eval").add_command(eval_mmlu)
