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
        click.option("--mode", type=click.Choice(["generate", "loglik"]), default="generate", show_default=True,
                     help="generate: sample an answer and parse it; loglik: score every option."),
        click.option("--full-answer", is_flag=True, help="Keep generating after the answer is decided."),
        click.option("--max-tokens", type=int, default=16, show_default=True, help="New tokens at most."),
        click.option("--temperature", type=float, default=None, help="Default 0.8 (llama-cpp-python's)."),
        click.option("--top-k", type=int, default=None, help="Default 40 (the protocol)."),
        click.option("--top-p", type=float, default=None, help="Default 0.95."),
        click.option("--min-p", type=float, default=None, help="Default 0.05."),
        click.option("--repeat-penalty", type=float, default=None, help="Default 1.0."),
        click.option("--n-ctx", type=int, default=4096, show_default=True),
        click.option("--rag", "rag", type=click.Path(), default=None, help="RAG index folder (tools rag index)."),
        click.option("--k", "k", type=int, default=6, show_default=True, help="Chunks to retrieve with --rag."),
        click.option("--out", type=click.Path(), default=None, help="Output folder (default runs/bench/...)."),
        click.option("--force", is_flag=True, help="Re-run even if the same run exists."),
        click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run(task, model, data, split, limit, seed, threads, mode, full_answer, max_tokens, temperature, top_k,
         top_p, min_p, repeat_penalty, n_ctx, rag, k, out, force, as_json):
    from tools.progress import out as stdout

    from .bench import run_bench
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                "repeat_penalty": repeat_penalty}
    art = run_bench(task, model=model, data=data, split=split, limit=limit, seed=seed, threads=threads, mode=mode,
                    full_answer=full_answer, max_tokens=max_tokens, sampling=sampling, out=out, force=force,
                    rag=rag, k=k, n_ctx=n_ctx)
    res = json.loads((art.path / "results.json").read_text(encoding="utf-8"))
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True))
        return
    t = art.extra.get("timing", {})
    line = (f"{task} {mode}: n={res['n']} accuracy={res['accuracy']:.3f} valid={res['valid_rate']:.3f} "
            f"macro_f1={res['macro_f1']:.3f}")
    if mode == "loglik":
        line += f" accuracy_norm={res['accuracy_norm']:.3f}"
    if t:
        line += f" ({t.get('s_per_item')} s/item)"
    stdout.print(line, markup=False)
    stdout.print(f"artifact: {art.path}", markup=False)


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


@click.command("mmlu-medical")
@click.option("--model", "model", type=click.Path(), default=None,
              help="HF model folder or GGUF file (default: the embedded SmolLM2 GGUF).")
@click.option("--shots", type=click.Choice(["0", "5"]), default="0", show_default=True)
@click.option("--subjects", default=None, help="Comma-separated subset of the nine subjects.")
@click.option("--limit", type=int, default=None, help="Only the first N questions of each subject.")
@click.option("--threads", type=int, default=None, help="llama.cpp threads for a GGUF (default: physical cores).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="lm-eval batch size (HF models).")
@click.option("--out", type=click.Path(), default=None, help="Output folder (default runs/eval/mmlu-medical-...).")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def eval_mmlu(model, shots, subjects, limit, threads, batch_size, out, force, as_json):
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
                   batch_size=batch_size, out=out, force=force)
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
    group("eval").add_command(eval_mmlu)
