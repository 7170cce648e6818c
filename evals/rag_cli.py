"""CLI: `tools rag index`, `tools rag query`, `tools eval semantic` (heavy imports inside the commands)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from tools.errors import UserError


@click.command("index")
@click.option("--corpus", required=True, type=click.Path(), help="corpus.* artifact folder (corpus.jsonl of {id,text,source}).")
@click.option("--embedder", default=None,
              help="sentence-transformers model: a folder or a cached Hub id (LoRAG used thenlper/gte-small). "
                   "Default: the packaged all-MiniLM-L6-v2 (offline).")
@click.option("--chunk-tokens", default=256, show_default=True, help="Chunk length in the embedder's tokens.")
@click.option("--overlap", default=32, show_default=True, help="Tokens shared by consecutive chunks.")
@click.option("--batch-size", default=32, show_default=True, help="Chunks embedded per batch.")
@click.option("--out", required=True, type=click.Path(), help="Index artifact folder to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's summary as JSON.")
@click.option("--force", is_flag=True, help="Rebuild even if an identical index exists.")
def index_cmd(corpus, embedder, chunk_tokens, overlap, batch_size, out, as_json, force):
    """Chunk a corpus, embed the chunks and store a FAISS cosine index with the chunk metadata.

    \b
    Example:
      tools rag index --corpus runs/textbooks --out runs/rag-textbooks
      tools rag index --corpus runs/textbooks --embedder models/gte-small --chunk-tokens 256 --overlap 32 --out runs/rag-gte
    """
    from evals.rag import build_index
    from tools.progress import out as console

    art = build_index(corpus, out, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap,
                      batch_size=batch_size, force=force)
    summary = {"index": str(art.path), "n_docs": art.extra.get("n_docs"), "n_chunks": art.extra.get("n_chunks"),
               "embedder": art.extra.get("embedder", {}).get("name"), "dim": art.extra.get("embedder", {}).get("dim"),
               "chunk_tokens": art.extra.get("chunk_tokens"), "overlap": art.extra.get("overlap"),
               "credentialed": art.lineage.credentialed}
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        console.print(f"{summary['n_chunks']} chunks from {summary['n_docs']} documents, {summary['embedder']} "
                      f"(dim {summary['dim']}) -> {art.path}")


@click.command("query")
@click.argument("index_dir", type=click.Path())
@click.argument("text")
@click.option("--k", default=6, show_default=True, help="How many chunks to return.")
@click.option("--embedder", default=None, help="Query-side model; must be the one the index was built with "
                                               "(default: the index's own).")
@click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
def query_cmd(index_dir, text, k, embedder, as_json):
    """Show what the index returns for a question (rank, cosine, chunk id, source, text).

    \b
    Example:
      tools rag query runs/rag-textbooks "first-line treatment of stage 1 hypertension" --k 3
    """
    from evals.rag import Retriever
    from tools.progress import out as console

    if k < 1:
        raise UserError(f"must be a positive integer, got {k}", field="--k")
    if not text.strip():
        raise UserError("the query is empty", field="TEXT")
    hits = Retriever(index_dir, embedder=embedder).search(text, k)
    if as_json:
        click.echo(json.dumps(hits, indent=2, sort_keys=True, ensure_ascii=False))
        return
    for h in hits:
        snippet = " ".join(h["text"].split())
        snippet = snippet if len(snippet) <= 240 else snippet[:237] + "..."
        console.print(f"{h['rank'] + 1:>2}. {h['score']:.4f}  {h['id']}  [{h['source']}]\n    {snippet}", markup=False)


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
@click.option("--out", type=click.Path(), default=None, help="Artifact folder (default: beside the input, <name>-semantic).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json.")
@click.option("--force", is_flag=True)
def semantic_cmd(results_dir, pred, ref, bertscore_model, bertscore_layer, semscore_model, nli_model, seq2seq_dir,
                 data, split, max_new_tokens, limit, batch_size, out, as_json, force):
    """BERTScore F1, SemScore (embedding cosine) and NLI entailment of predictions against references.

    Each metric names the model used, or says why it was skipped. Per-item scores in items.jsonl,
    means in results.json, a report and a PNG of the distributions.

    \b
    Examples:
      tools eval semantic runs/bench-seq2seq --nli-model models/roberta-large-mnli
      tools eval semantic --pred preds.jsonl --ref refs.jsonl --bertscore-model models/roberta-large --out runs/sem
      tools eval semantic --seq2seq runs/t5-stage/output --data runs/pubmedqa --split test --out runs/t5-sem
    """
    from evals.semantic import METRICS, evaluate, read_results
    from tools.progress import out as console

    if seq2seq_dir is not None:
        if results_dir is not None or pred is not None:
            raise UserError("--seq2seq generates the predictions: give no RESULTS_DIR or --pred with it", field="--seq2seq")
        if data is None:
            raise UserError("--seq2seq needs --data DATASET_DIR (the questions and reference answers)", field="--data")
        from recipes.seq2seq import predict

        base = Path(out) if out else Path(seq2seq_dir).parent / f"{Path(data).name}-{split}"
        results_dir = str(predict(seq2seq_dir, data, base.parent / f"{base.name}-predictions", split=split,
                                  max_new_tokens=max_new_tokens, limit=limit, force=force).path)
    if results_dir is None and pred is None:
        raise UserError("give a RESULTS_DIR or --pred FILE (with --ref FILE)", field="RESULTS_DIR")
    src = Path(results_dir or pred)
    if out is None:
        out = src.parent / f"{src.name.split('.')[0]}-semantic"
    art = evaluate(out, results=results_dir, pred=pred, ref=ref, bertscore_model=bertscore_model,
                   semscore_model=semscore_model, nli_model=nli_model, bertscore_layer=bertscore_layer,
                   batch_size=batch_size, limit=limit, force=force)
    res = read_results(art)
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True))
        return
    console.print(f"{res['n']} items -> {art.path}")
    for m in METRICS:
        if m in res["metrics"]:
            r = res["metrics"][m]
            console.print(f"  {m:<15} {r['mean']:.4f}  ({r['model']}" + (f"; {r['note']}" if r.get("note") else "") + ")",
                          markup=False)
        else:
            console.print(f"  {m:<15} skipped: {res['skipped'][m]}", markup=False)


def register(cli):
    from tools.cli import group

    group("rag").add_command(index_cmd)
    group("rag").add_command(query_cmd)
    group("eval").add_command(semantic_cmd)
