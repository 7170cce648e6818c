"""The evals package's verbs: bench pubmedqa|medqa|mcq, eval mmlu-medical|perplexity|semantic, rag index|query,
analyze errors, report, sweep. Each parses, calls one library function and prints (heavy imports inside)."""
from __future__ import annotations

from pathlib import Path

import click

from tools.cli_options import N_GPU_LAYERS_HELP, artifact_options, emit_json, json_option, read_results, threads_option
from tools.errors import UserError, WorkError


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.table import Table

    from tools.progress import out

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    out.print(t)


def _print(*lines: str) -> None:
    from tools.progress import out

    for line in lines:
        out.print(line, markup=False)


# ---- bench -----------------------------------------------------------------------------------

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
        threads_option,
        click.option("--n-gpu-layers", type=int, default=None, help=N_GPU_LAYERS_HELP),
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
        artifact_options("Output folder (default runs/bench/...)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def check_bench_options(cmd: click.Command) -> None:
    """Every option of a bench verb is a BenchSpec field, a sampling knob, --map or --json (and back)."""
    from dataclasses import fields

    from .bench import BenchSpec

    names = {p.name for p in cmd.params} - {"as_json", "maps", "answer_base"}
    spec = {f.name for f in fields(BenchSpec)} - {"task", "sampling", "field_map", "n_batch", "plots"}
    if names != spec | set(BenchSpec.SAMPLING_OPTIONS):
        raise AssertionError(f"bench options and BenchSpec differ: {sorted(names ^ (spec | set(BenchSpec.SAMPLING_OPTIONS)))}")


def _bench(task: str, as_json: bool, params: dict) -> None:
    from .bench import BenchSpec, run_bench, summary_lines

    art = run_bench(BenchSpec.from_options(task, params))
    res = read_results(art)
    if as_json:
        return emit_json(art, res)
    _print(*summary_lines(task, res, art), f"artifact: {art.path} (brackets: 95 % intervals)")


@click.command("pubmedqa")
@_bench_options
def bench_pubmedqa(as_json, **kw):
    """PubMedQA (official 500 test ids) on a GGUF.

    \b
    Example:
      tools bench pubmedqa --limit 40
      tools bench pubmedqa --model out/model.Q3_K_L.gguf --mode loglik --out runs/bench/pqa
    """
    _bench("pubmedqa", as_json, kw)


@click.command("medqa")
@_bench_options
def bench_medqa(as_json, **kw):
    """MedQA (USMLE, 4 options) on a GGUF.

    \b
    Example:
      tools bench medqa --limit 50 --mode loglik
    """
    _bench("medqa", as_json, kw)


@click.command("mcq")
@_bench_options
@click.option("--map", "maps", multiple=True,
              help="Rename fields: TARGET=SOURCE (targets id, question, options, answer, context); "
                   "options=a+b+c+d gathers several fields.")
@click.option("--answer-base", type=click.Choice(["0", "1"]), default=None,
              help="Integer answers count options from 0 or from 1 (default: told from the file, else refused). "
                   "MedMCQA's GitHub dev.json: 1; its Hub export: 0.")
def bench_mcq(as_json, **kw):
    """Any multiple-choice or yes/no/maybe JSONL (--data), under the same protocol and reports.

    A row: question, options (list -> A, B, C...; or {label: text}), answer (label, option text or
    index: 0- or 1-based as the file shows, or --answer-base), optional context and id. Yes/no/maybe
    sets are asked like PubMedQA, others like MedQA.

    \b
    Example:
      tools bench mcq --data exam.jsonl --mode loglik
      tools bench mcq --data dev.json --map options=opa+opb+opc+opd --map answer=cop --limit 100
      tools bench mcq --data exam.jsonl --dev exam-dev.jsonl --shots 3 --cot --samples 5
    """
    _bench("mcq", as_json, kw)


# ---- eval ------------------------------------------------------------------------------------

@click.command("mmlu-medical")
@click.option("--model", "model", type=click.Path(), default=None,
              help="HF model folder or GGUF file (default: the embedded SmolLM2 GGUF).")
@click.option("--shots", type=click.Choice(["0", "5"]), default="0", show_default=True)
@click.option("--subjects", default=None, help="Comma-separated subset of the nine subjects.")
@click.option("--limit", type=int, default=None, help="Only the first N questions of each subject.")
@threads_option
@click.option("--n-gpu-layers", type=int, default=None, help=N_GPU_LAYERS_HELP)
@click.option("--batch-size", type=int, default=1, show_default=True, help="lm-eval batch size (HF models).")
@artifact_options("Output folder (default runs/eval/mmlu-medical-...).")
def eval_mmlu(model, shots, subjects, limit, threads, n_gpu_layers, batch_size, out, force, as_json):
    """MMLU-medical (nine subjects) through lm-eval with local task files (no Hub).

    \b
    Example:
      tools eval mmlu-medical --limit 20
      tools eval mmlu-medical --model runs/merge --shots 5
    """
    from .mmlu import MmluSpec, run_mmlu, summary_lines

    subj = tuple(s.strip() for s in subjects.split(",") if s.strip()) if subjects else None
    spec = MmluSpec(model=model, shots=int(shots), subjects=subj, limit=limit, threads=threads,
                    n_gpu_layers=n_gpu_layers, batch_size=batch_size)
    art = run_mmlu(spec, out, force=force)
    res = read_results(art)
    if as_json:
        return emit_json(art, res)
    _print(*summary_lines(res), f"artifact: {art.path}")


def _data_pairs(pairs: tuple[str, ...], flag: str = "--data") -> dict[str, str]:
    out = {}
    for p in pairs:
        name, sep, path = p.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"{p!r} is not TASK=FILE", field=flag)
        out[name.strip()] = path.strip()
    return out


MEDITRON_ONLY = ("dev", "tasks", "shots", "seeds", "cot", "samples", "max_tokens")


@click.command("suite")
@click.argument("protocol", type=click.Choice(["open-medical", "meditron"]))
@click.option("--model", "model", type=click.Path(), default=None,
              help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1).")
@click.option("--data", "data", multiple=True,
              help="TASK=FILE: data for a task (medmcqa is not shipped: --data medmcqa=dev.json); repeatable.")
@click.option("--answer-base", type=click.Choice(["0", "1"]), default=None,
              help="MedMCQA cop counted from 0 (Hub export) or 1 (GitHub dev.json); default: told from the file.")
@click.option("--limit", type=int, default=None,
              help="Only the first N questions of each task (meditron: of each MMLU subject) - a quick look.")
@click.option("--tasks", default=None,
              help="meditron: comma-separated tasks to run (mmlu_medical, pubmedqa, medmcqa, medqa, medqa4); "
                   "default all.")
@click.option("--dev", "dev", multiple=True,
              help="meditron: TASK=FILE, the few-shot pool of a task (default: the bundled dev split; medmcqa "
                   "needs one, e.g. its train.json); repeatable.")
@click.option("--shots", type=int, default=None, help="meditron: examples per prompt, drawn per seed (default 5).")
@click.option("--seeds", type=int, default=None,
              help="meditron: runs with seeds 0..N-1 (shots and sampling); mean and SD over them (default 3).")
@click.option("--cot", is_flag=True, default=None, help="meditron: reasoning first, then a final 'Answer: X' line.")
@click.option("--samples", type=int, default=None,
              help="meditron: N sampled answers an item, majority vote (self-consistency; default 1).")
@click.option("--max-tokens", type=int, default=None, help="meditron: new tokens at most (default 16; 256 with --cot).")
@threads_option
@click.option("--n-gpu-layers", type=int, default=None, help=N_GPU_LAYERS_HELP)
@click.option("--n-ctx", type=int, default=4096, show_default=True)
@artifact_options("Output folder (default runs/eval/<protocol>-<model>).")
def suite_cmd(protocol, as_json, **kw):
    """A published protocol on a GGUF, one table. open-medical: the Open Medical-LLM Leaderboard's
    nine tasks, zero-shot log-likelihood acc. meditron: Meditron's evaluation (generated answers,
    few-shot over several seeds, unparseable answers counted). Both offline.

    open-medical: lm-eval's own task files build every prompt (MedMCQA, MedQA 4 options, PubMedQA,
    six MMLU subjects); llama.cpp scores them with prefix reuse. meditron: MMLU-medical (nine
    subjects), PubMedQA, MedMCQA, MedQA 5 and 4 options through the `tools bench` protocol, each
    task and seed one bench run on one loaded model. Per-task accuracy with its 95 % interval, the
    average, items per task, a table laid out like the protocol's own and a plot. A killed run resumes.

    \b
    Example:
      tools eval suite open-medical --limit 20
      tools eval suite open-medical --model out/model.Q3_K_L.gguf --data medmcqa=medmcqa/dev.json
      tools eval suite meditron --limit 10 --seeds 3 --shots 3
      tools eval suite meditron --tasks medqa4,pubmedqa --cot --samples 5 --shots 0 --seeds 1
    """
    data, answer_base = _data_pairs(kw.pop("data")), kw.pop("answer_base")
    answer_base = None if answer_base is None else int(answer_base)
    if protocol == "open-medical":
        given = [k for k in MEDITRON_ONLY if kw.get(k) not in (None, ())]
        if given:
            raise UserError("only for tools eval suite meditron (open-medical is zero-shot log-likelihood)",
                            field="--" + given[0].replace("_", "-"))
        from .suite import SuiteSpec, run_suite, summary_lines

        spec = SuiteSpec(model=kw["model"], data=data, answer_base=answer_base, limit=kw["limit"],
                         threads=kw["threads"], n_ctx=kw["n_ctx"], n_gpu_layers=kw["n_gpu_layers"], out=kw["out"],
                         force=kw["force"])
        art = run_suite(spec)
    else:
        from .suite_meditron import MeditronSpec, run_meditron, summary_lines

        tasks = tuple(t.strip() for t in kw.pop("tasks").split(",") if t.strip()) if kw.get("tasks") else None
        opts = {k: v for k, v in kw.items() if v is not None and k != "dev"}
        art = run_meditron(MeditronSpec(**{**opts, "data": data, "dev": _data_pairs(kw["dev"], "--dev"),
                                           "tasks": tasks, "answer_base": answer_base}))
    res = read_results(art)
    if as_json:
        return emit_json(art, res)
    _print(*summary_lines(res), f"artifact: {art.path} (brackets: 95 % intervals)")


@click.command("perplexity")
@click.option("--model", "models", multiple=True, required=True,
              help="HF model folder or GGUF file; repeat to compare (e.g. base and fine-tuned).")
@click.option("--data", required=True, type=click.Path(), help="SFT dataset artifact folder (or a ChatML JSONL).")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="First N items only.")
@click.option("--n-gpu-layers", type=int, default=None, help=N_GPU_LAYERS_HELP)
@artifact_options("Artifact folder for the results (default: none, print only).")
def perplexity_cmd(models, data, split, limit, n_gpu_layers, out, force, as_json):
    """Mean cross-entropy and perplexity over answer tokens only (prompt masked, as in training).

    \b
    Example:
      tools eval perplexity --model runs/base --model runs/sft/merged --data runs/pubmedqa --split test
    """
    from tools.artifact import read_artifact

    from .perplexity import run_perplexity

    results = run_perplexity(list(models), data, split=split, limit=limit, out=out, force=force,
                             n_gpu_layers=n_gpu_layers)
    if as_json:
        return emit_json(read_artifact(out) if out else None, results)
    _table(f"Loss / perplexity on {results[0]['n_items']} {split} items (answer tokens only)",
           ["model", "items", "answer tokens", "loss (mean CE)", "perplexity"],
           [[r["model"], r["n_items"], r["n_tokens"], r["mean_ce"], r["perplexity"]] for r in results])


@click.command("semantic")
@click.argument("results_dir", required=False, type=click.Path())
@click.option("--pred", type=click.Path(), default=None,
              help="Predictions: JSONL {id, prediction} (or with the reference too) or a text file, one a line.")
@click.option("--ref", type=click.Path(), default=None, help="References: JSONL {id, reference} or a text file.")
@click.option("--bertscore-model", default=None, help="Local model for BERTScore (default roberta-large if cached, "
                                                      "else the packaged MiniLM); 'none' skips.")
@click.option("--bertscore-layer", type=int, default=None, help="Layer for BERTScore (default: bert-score's table, "
                                                                "else the last layer).")
@click.option("--semscore-model", default=None, help="sentence-transformers model for SemScore (default "
                                                     "all-mpnet-base-v2 if cached, else the packaged MiniLM); 'none' skips.")
@click.option("--nli-model", default=None, help="MNLI sequence classifier (default roberta-large-mnli if cached, "
                                                "else skipped); 'none' skips.")
@click.option("--seq2seq", "seq2seq_dir", type=click.Path(), default=None,
              help="A seq2seq (T5) `train` output: generate its answers on --data first, then score them.")
@click.option("--data", type=click.Path(), default=None, help="With --seq2seq: the dataset artifact to answer.")
@click.option("--split", default="test", show_default=True, help="With --seq2seq: the dataset split.")
@click.option("--max-new-tokens", default=128, show_default=True, help="With --seq2seq: answer length limit.")
@click.option("--limit", type=int, default=None, help="First N items only.")
@click.option("--batch-size", default=16, show_default=True)
@artifact_options("Artifact folder (default: beside the input, <name>-semantic).")
def semantic_cmd(as_json, **kw):
    """BERTScore F1, SemScore (embedding cosine) and NLI entailment of predictions against references.

    Each metric names the model used, or says why it was skipped. Per-item scores in items.jsonl,
    means in results.json, a report and a PNG of the distributions.

    \b
    Examples:
      tools eval semantic runs/bench-seq2seq --nli-model models/roberta-large-mnli
      tools eval semantic --pred preds.jsonl --ref refs.jsonl --bertscore-model models/roberta-large --out runs/sem
      tools eval semantic --seq2seq runs/t5-stage/output --data runs/pubmedqa --split test --out runs/t5-sem
    """
    from .semantic import run_semantic, summary_lines

    art = run_semantic(**kw)
    res = read_results(art)
    if as_json:
        return emit_json(art, res)
    _print(f"{res['n']} items -> {art.path}", *summary_lines(res))


# ---- rag -------------------------------------------------------------------------------------

@click.command("index")
@click.option("--corpus", required=True, type=click.Path(), help="corpus.* artifact folder (corpus.jsonl of {id,text,source}).")
@click.option("--embedder", default=None,
              help="sentence-transformers model: a folder or a cached Hub id (LoRAG used thenlper/gte-small). "
                   "Default: the packaged all-MiniLM-L6-v2 (offline).")
@click.option("--chunk-tokens", default=256, show_default=True, help="Chunk length in the embedder's tokens.")
@click.option("--overlap", default=32, show_default=True, help="Tokens shared by consecutive chunks.")
@click.option("--batch-size", default=32, show_default=True, help="Chunks embedded per batch.")
@artifact_options("Index artifact folder to write.", out_required=True)
def index_cmd(corpus, embedder, chunk_tokens, overlap, batch_size, out, force, as_json):
    """Chunk a corpus, embed the chunks and store a FAISS cosine index with the chunk metadata.

    \b
    Example:
      tools rag index --corpus runs/textbooks --out runs/rag-textbooks
      tools rag index --corpus runs/textbooks --embedder models/gte-small --chunk-tokens 256 --overlap 32 --out runs/rag-gte
    """
    from .rag import build_index

    art = build_index(corpus, out, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap,
                      batch_size=batch_size, force=force)
    if as_json:
        return emit_json(art)
    e = art.extra
    _print(f"{e.get('n_chunks')} chunks from {e.get('n_docs')} documents, {e.get('embedder', {}).get('name')} "
           f"(dim {e.get('embedder', {}).get('dim')}) -> {art.path}")


@click.command("query")
@click.argument("index_dir", type=click.Path())
@click.argument("text")
@click.option("--k", default=6, show_default=True, help="How many chunks to return.")
@click.option("--embedder", default=None, help="Query-side model; must be the one the index was built with "
                                               "(default: the index's own).")
@json_option
def query_cmd(index_dir, text, k, embedder, as_json):
    """Show what the index returns for a question (rank, cosine, chunk id, source, text).

    \b
    Example:
      tools rag query runs/rag-textbooks "first-line treatment of stage 1 hypertension" --k 3
    """
    from .rag import hit_line, query_index

    hits = query_index(index_dir, text, k, embedder=embedder)
    if as_json:
        return emit_json(None, hits)
    _print(*map(hit_line, hits))


# ---- analyses --------------------------------------------------------------------------------

@click.command("errors", help="Classify each prediction of a bench result as correct / underspecified / "
               "incorrect and plot the lengths of the incorrect ones.\n\n\b\nExample:\n"
               "  tools analyze errors runs/bench/pubmedqa-generate --out runs/errors\n\n\b\nRules:\n"
               + "\n".join("  " + ln.strip() for ln in __import__("evals.analysis", fromlist=["RULES"]).RULES.splitlines()))
@click.argument("results_dir", type=click.Path())
@click.option("--min-tokens", default=1, show_default=True, help="Outputs shorter than this are underspecified.")
@artifact_options("Artifact folder (default RESULTS_DIR/../<name>-errors).")
def errors_cmd(results_dir, min_tokens, out, force, as_json):
    from .analysis import run_errors

    art = run_errors(results_dir, out, min_tokens=min_tokens, force=force)
    res = read_results(art, "errors.json")
    if as_json:
        return emit_json(art, res)
    _table(f"Error classes ({res['n']} items)", ["class", "items", "share"],
           [[k, res["counts"][k], f"{res['shares'][k]:.1%}"] for k in res["counts"]])
    click.echo(f"report: {art.path / 'report.md'}  histogram: {art.path / 'incorrect_lengths.png'}")


@click.command("report")
@click.argument("bench_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--label", "labels", multiple=True, help="Column label per run (default: folder names).")
@click.option("--title", default=None, help="Report title [MediLoRA: base vs fine-tuned under the MediLoRA protocol].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the paired bootstrap.")
@click.option("--include", "includes", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A file to append as a section (Markdown as is, others as a code block), e.g. a quant table.")
@click.option("--evidence", "evidence", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Release evidence for the ship-or-not verdict: the shipped gguf (budget, memory), the "
                   "quantization table, the memorization audit (repeatable).")
@click.option("--general", "general", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Two `tools eval general` runs, base then tuned: adds their paired difference and a verdict line.")
@artifact_options("Report artifact folder (report.md + compare.png).", out_required=True)
def report_cmd(bench_dirs, labels, title, seed, includes, evidence, general, out, force, as_json):
    """Put bench runs side by side on the same items: accuracy, valid-response rate, macro-F1, each
    with its 95 % interval; every run after the first is tested against the first on the shared items
    (exact McNemar on accuracy, paired bootstrap on macro-F1) and the report says whether it beats it.

    \b
    Example:
      tools report runs/demo/bench_base runs/demo/bench_tuned --label base --label tuned --out runs/demo/report
      tools report runs/demo/bench_base runs/demo/bench_tuned --evidence runs/demo/q3kl --evidence runs/demo/audit \\
        --out runs/demo/report      # opens with the ship-or-not verdict
    """
    from .paired import DEFAULT_TITLE, Attachments, run_report

    art = run_report(bench_dirs, out, labels=labels, title=title or DEFAULT_TITLE, seed=seed, force=force,
                     attach=Attachments(tuple(includes), tuple(evidence), tuple(general)))
    if as_json:
        return emit_json(art, read_results(art, "compare.json"))
    click.echo((art.path / "report.md").read_text())


@click.command("sweep")
@click.argument("stage_dir", type=click.Path())
@click.option("--grid", "grids", multiple=True, help="KEY=V1,V2,... (Axolotl keys; repeat for more keys).")
@click.option("--optuna", "optuna_trials", type=int, default=None,
              help="Let Optuna (TPE, seeded) choose N trials from the grid's values instead of trying all.")
@click.option("--objective", default="loss", show_default=True,
              help='Expression over logged metrics to minimise, e.g. "eval_loss - 0.25*entailment".')
@click.option("--eval", "evals", multiple=True,
              help="Evaluate every trial's model with a verb and expose its figures to the objective: "
                   "\"bench pubmedqa --mode loglik --split dev --limit 20\" (accuracy, macro_f1, valid_rate, ...) "
                   "or \"eval semantic --data D --split validation\" for seq2seq trials (entailment, ...).")
@click.option("--seed", default=0, show_default=True)
@artifact_options("Sweep artifact folder (default STAGE_DIR-sweep).")
def sweep_cmd(stage_dir, grids, optuna_trials, objective, evals, seed, out, force, as_json):
    """Hyper-parameter sweep over a stage: each trial is a real `tools train` run of a derived stage.

    Trials live in OUT-trials/NN (stage folders of their own). The table of trials, a PNG of final
    loss vs learning rate per micro batch size, and the best trial go into OUT's manifest.

    \b
    Example:
      tools sweep runs/sft --grid learning_rate=1e-4,1e-3 --grid micro_batch_size=2,4
      tools sweep runs/sft --grid learning_rate=1e-5,1e-4,1e-3 --optuna 4 --objective "eval_loss"
      tools sweep runs/sft --grid learning_rate=1e-4,1e-3 --objective "eval_loss - accuracy" \\
        --eval "bench pubmedqa --mode loglik --split dev --limit 20"
    """
    from .sweep import sweep_stage, trials_table

    art = sweep_stage(stage_dir, grids=grids, optuna_trials=optuna_trials, objective=objective,
                      evals=tuple(parse_eval(e) for e in evals), seed=seed, out=out, force=force)
    rows = read_results(art, "trials.json")
    if as_json:
        return emit_json(art, rows)
    from tools.progress import out as console

    console.print(trials_table(rows, art.params["grid"], f"Sweep of {stage_dir} ({len(rows)} trials, "
                                                          f"objective {objective})"))
    click.echo(f"best: trial {art.extra['best']['trial']} {art.extra['best']['params']}  ({art.path})")


@click.command("audit")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--train", "train", required=True, type=click.Path(path_type=Path),
              help="What the model was trained on: a corpus or dataset artifact, or a JSONL file.")
@click.option("--heldout", required=True, type=click.Path(path_type=Path),
              help="Documents of the same kind it never saw (corpus/dataset artifact or JSONL; a split's test.jsonl).")
@click.option("--base", default=None,
              help="The model it was trained from (GGUF, HF folder, Hub id, or `embedded` for the packaged "
                   "SmolLM2 GGUF): extraction and loss are compared with it.")
@click.option("--canaries-from", type=click.Path(path_type=Path), default=None,
              help="Corpus artifact whose manifest lists the canaries [--train].")
@click.option("--docs", default=100, show_default=True, type=click.IntRange(1), help="Documents sampled from each side.")
@click.option("--prefix", default=32, show_default=True, type=click.IntRange(1), help="Extraction prefix (tokens).")
@click.option("--suffix", default=32, show_default=True, type=click.IntRange(1),
              help="Tokens greedy decoding must reproduce verbatim.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(2),
              help="Tokens of each document scored for the membership loss.")
@click.option("--candidates", default=1000, show_default=True, type=click.IntRange(10),
              help="Random secrets each canary is ranked against.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-extraction-excess", default=0.02, show_default=True, type=float,
              help="Fail when the extraction rate exceeds the base's by more than this.")
@click.option("--max-auc", default=0.6, show_default=True, type=float,
              help="Fail when the membership AUC's lower 95 % bound exceeds this.")
@click.option("--max-exposure", default=10.0, show_default=True, type=float,
              help="Fail when a canary's exposure exceeds this many bits.")
@click.option("--min-loss-gap", default=0.1, show_default=True, type=float,
              help="Judge the membership AUC only when training documents gained this many nats/token over held-out.")
@click.option("--check", is_flag=True, help="Exit 1 when the audit fails (the artifact is written either way).")
@artifact_options("Audit artifact folder (audit.json, audit.md, audit.png).", out_required=True, path_type=Path)
def audit_cmd(model, train, heldout, base, canaries_from, docs, prefix, suffix, max_tokens, candidates, seed,
              max_extraction_excess, max_auc, max_exposure, min_loss_gap, check, out, force, as_json):
    """Memorization audit: extraction vs the base, membership-inference AUC, canary exposure; pass or fail.

    MODEL is the GGUF that ships (or a gguf artifact) or an HF checkpoint (merge, full fine-tune,
    adapter) for comparison. A model trained on credentialed data goes up (`tools push`) only with
    a passing audit of that exact file.

    \b
    Example:
      tools audit runs/q3kl --train runs/notes --heldout runs/notes-heldout --base runs/base-gguf --out runs/audit
    """
    from .audit import AuditSpec, Limits, run_audit

    if base == "embedded":
        from tools.paths import embedded_gguf
        base = embedded_gguf()
    spec = AuditSpec(model, train, heldout, base=base, canaries_from=canaries_from, docs=docs, prefix=prefix,
                     suffix=suffix, max_tokens=max_tokens, candidates=candidates, seed=seed,
                     limits=Limits(max_extraction_excess, max_auc, max_exposure, min_loss_gap))
    art = run_audit(spec, out, force=force)
    res = read_results(art, "audit.json")
    if as_json:
        emit_json(art, res)
    else:
        click.echo((art.path / "audit.md").read_text().split("## Extraction")[0].rstrip())
        click.echo(f"audit -> {art.path}")
    if check and not res["passed"]:
        raise WorkError(f"the memorization audit failed ({art.path / 'audit.md'})")


@click.command("general")
@click.option("--model", required=True, help="HF model folder (or a cached Hub id) or GGUF file.")
@click.option("--ctx", default=256, show_default=True, help="Tokens a window.")
@click.option("--max-tokens", default=4096, show_default=True, help="Tokens of held-out text scored.")
@threads_option
@artifact_options("Output folder (default runs/eval/general-MODEL).")
def general_cmd(model, ctx, max_tokens, threads, out, force, as_json):
    """General ability: perplexity on held-out general English that ships with Python (CPython's
    topic docs, PSF-2.0; the half never used for replay), with a 95 % bootstrap interval.

    \b
    Example:
      tools eval general --model runs/base --out runs/general-base
      tools eval general --model runs/merged --out runs/general-tuned
      tools report runs/bench-base runs/bench-tuned --general runs/general-base --general runs/general-tuned --out r
    """
    from .general import run_general

    art = run_general(model, out, ctx=ctx, max_tokens=max_tokens, threads=threads, force=force)
    res = read_results(art, "results.json")
    if as_json:
        return emit_json(art, res)
    _print(f"general: perplexity {res['perplexity']} {res['perplexity_ci95']} on {res['tokens']} tokens "
           f"({res['windows']} windows) -> {art.path}")


@click.command("pairs")
@click.option("--bench", "bench_dir", required=True, type=click.Path(),
              help="A bench run on dev or train items (bench --split dev, or bench mcq on a dev file).")
@artifact_options("Output dataset folder.", out_required=True)
def pairs_cmd(bench_dir, out, force, as_json):
    """Preference pairs from a bench run's mistakes: chosen = the gold answer in the protocol's format
    (PubMedQA with its long answer), rejected = the model's own wrong or unparseable answer.
    Test-split runs and files holding benchmark test items are refused.

    \b
    Example:
      tools bench pubmedqa --model runs/sft.gguf --split dev --limit 200 --out runs/bench-dev
      tools build-dataset pairs --bench runs/bench-dev --out runs/pairs
    """
    from .pairs import build_pairs

    art = build_pairs(bench_dir, out, force=force)
    if as_json:
        return emit_json(art)
    _print(f"pairs: {art.path} ({art.extra['items']} pairs of {art.extra['counts']['items']} items)")


def _checkpoint_selector(spec: str):
    from .select import selector

    return selector(spec)


def parse_eval(text: str):
    """``--eval "bench TASK OPTIONS"`` / ``"eval semantic OPTIONS"`` parsed by that verb's own options."""
    import shlex

    from .trials import EVAL_VERBS, SET_BY_SWEEP, EvalSpec

    toks = shlex.split(text)
    if len(toks) >= 2 and toks[0] == "tools":
        toks = toks[1:]
    if len(toks) < 2 or (toks[0], toks[1]) not in EVAL_VERBS:
        raise UserError(f"--eval {text!r}: expected 'bench pubmedqa|medqa|mcq OPTIONS' or 'eval semantic OPTIONS'",
                        field="--eval")
    for bad in SET_BY_SWEEP:
        if bad in toks:
            raise UserError(f"--eval {text!r}: {bad} is set by the sweep for each trial", field="--eval")
    cmd = {"pubmedqa": bench_pubmedqa, "medqa": bench_medqa, "mcq": bench_mcq, "semantic": semantic_cmd}[toks[1]]
    try:
        params = cmd.make_context(f"{toks[0]} {toks[1]}", list(toks[2:]), resilient_parsing=False).params
    except click.ClickException as e:
        raise UserError(f"--eval {text!r}: {e.format_message()}", field="--eval") from None
    return EvalSpec(text, toks[0], toks[1], params)


def register(cli):
    from recipes.selection import register as register_selector
    from release.budget import register_accuracy
    from tools.cli import group

    register_selector(_checkpoint_selector)  # `tools train --select-by` (recipes cannot import evals)
    register_accuracy(_accuracy_probe)  # `tools quantize --budget acc-drop=N` (release cannot import evals)
    group("build-dataset").add_command(pairs_cmd)
    for cmd in (bench_pubmedqa, bench_medqa, bench_mcq):  # options checked against BenchSpec in tests/tools/test_cli.py
        group("bench").add_command(cmd)
    for cmd in (eval_mmlu, perplexity_cmd, semantic_cmd, suite_cmd, general_cmd):
        group("eval").add_command(cmd)
    group("rag").add_command(index_cmd)
    group("rag").add_command(query_cmd)
    group("analyze").add_command(errors_cmd)
    cli.add_command(report_cmd)
    cli.add_command(audit_cmd)
    cli.add_command(sweep_cmd)



def _accuracy_probe(data: str | None, threads: int | None = None):
    from .accdrop import accuracy_probe

    return accuracy_probe(data, threads)
