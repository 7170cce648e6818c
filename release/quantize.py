"""GGUF -> quantized GGUF, in-process through ``llama_cpp.llama_model_quantize``.

Any llama.cpp type name is accepted. llama.cpp silently falls back to other tensor types where a
row is not a multiple of the type's block (256 for k-quants): the report gives the real tensor-type
mix and the effective bits per weight, and warns when the requested type was mostly not applied.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

from tools.artifact import Stage, is_artifact
from tools.errors import UserError, WorkError
from tools.ggufpath import default_threads, resolve_gguf
from tools.progress import log, progress

from .ggufinfo import (
    gguf_filename,
    gguf_module,
    is_quantized,
    primary_tensor_type,
    read_gguf,
    resolve_ftype,
    split_gguf,
    type_share,
)

MOSTLY_APPLIED = 0.5
LOG_LINES: list[str] = []  # warn when less than half the weight-matrix elements got the requested type
# llama.cpp's tensor_requires_imatrix (src/llama-quant.cpp): these tensor types are not made without an
# importance matrix; for some file types llama.cpp throws, for others (IQ3_XXS) it silently substitutes
# Q3_K / IQ3_S, so the file would be named IQ3_XXS and hold none. Refused up front, with what to do.
IMATRIX_TENSOR_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")
IMATRIX_FILE_TYPES = ("Q2_K_S",)


def needs_imatrix(qname: str) -> bool:
    return qname in IMATRIX_FILE_TYPES or primary_tensor_type(qname) in IMATRIX_TENSOR_TYPES


def refuse_without_imatrix(qname: str) -> None:
    raise UserError(f"{qname} needs an importance matrix (llama.cpp does not make {primary_tensor_type(qname)} "
                    "weights without one): compute it on our own text with `tools imatrix F16.gguf --corpus CORPUS "
                    "--out DIR` and pass --imatrix DIR", field="--imatrix")


def load_imatrix(path: str | os.PathLike) -> dict[str, list[float]]:
    """An importance matrix as llama-quantize reads it: GGUF (``<t>.in_sum2`` / ``<t>.counts``) or legacy .dat."""
    import numpy as np

    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        raise UserError("imatrix file not found or empty", path=str(p), field="--imatrix")
    with open(p, "rb") as f:
        magic = f.read(4)
    data: dict[str, np.ndarray] = {}
    if magic == b"GGUF":
        try:
            r = gguf_module().GGUFReader(str(p), "r")
        except Exception as e:  # noqa: BLE001
            raise UserError(f"unreadable GGUF imatrix ({type(e).__name__})", path=str(p)) from None
        tensors = {t.name: t for t in r.tensors}
        for name, t in tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            base = name[: -len(".in_sum2")]
            c = tensors.get(base + ".counts")
            if c is None:
                raise UserError(f"imatrix has {name} without {base}.counts", path=str(p))
            sums = np.asarray(t.data, dtype=np.float32).reshape(-1)
            counts = np.asarray(c.data, dtype=np.float32).reshape(-1)
            ne0 = sums.size // max(counts.size, 1)
            e = np.ones_like(sums)
            for j, cnt in enumerate(counts):
                if cnt > 0:
                    e[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / cnt
            data[base] = e
    else:
        raw = p.read_bytes()
        try:
            off = 0
            (n,) = np.frombuffer(raw, np.int32, 1, off)
            off += 4
            for _ in range(int(n)):
                (ln,) = np.frombuffer(raw, np.int32, 1, off)
                off += 4
                name = raw[off:off + int(ln)].decode("utf-8")
                off += int(ln)
                ncall, nval = np.frombuffer(raw, np.int32, 2, off)
                off += 8
                vals = np.frombuffer(raw, np.float32, int(nval), off).copy()
                off += 4 * int(nval)
                if ncall > 0:
                    vals /= float(ncall)
                data[name] = vals
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"not an imatrix file (GGUF or legacy .dat): {e}", path=str(p)) from None
    if not data:
        raise UserError("imatrix holds no entries", path=str(p))
    for name, v in data.items():
        if not np.all(np.isfinite(v)):
            raise UserError(f"imatrix entry {name} holds NaN or inf", path=str(p))
    return data


def _quantize_call(src: Path, dst: Path, ftype: int, *, allow_requantize: bool, threads: int,
                   imatrix: dict | None) -> int:
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = allow_requantize
    keep = []
    if imatrix:
        n = len(imatrix)
        arr = (llama_cpp.llama_model_imatrix_data * (n + 1))()
        for i, (name, vals) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(vals, dtype=np.float32)
            cname = ctypes.c_char_p(name.encode("utf-8"))
            keep += [buf, cname]
            arr[i].name = cname.value
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[n].name = None  # terminator
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    from llama_cpp import _logger

    # llama.cpp writes one line per tensor (and one per fallback): collect them instead of flooding
    # the terminal; the summary says what happened, the last lines explain a failure.
    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        LOG_LINES.append(text.decode("utf-8", "replace"))

    LOG_LINES.clear()
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    del keep
    return int(rc)


def _expected_bytes(info: dict, qtype: str) -> int:
    """A rough size of the output (for the progress bar): weight matrices at the requested type."""
    g = gguf_module()
    try:
        block, tbytes = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[primary_tensor_type(qtype)]]
    except KeyError:
        block, tbytes = 1, 2
    mat = sum(h["elements"] for k, h in info["tensor_types"].items())
    return max(1, int(mat * tbytes / block))


def quantize_stage(src: str | os.PathLike, qtype: str, out: str | os.PathLike, *,
                   imatrix: str | os.PathLike | None = None, allow_requantize: bool = False,
                   name: str | None = None, threads: int | None = None, split_max_size: int | None = None,
                   force: bool = False):
    """Quantize ``src`` (.gguf or a ``gguf`` artifact) into artifact ``out`` (stage ``gguf``). ``imatrix``: a
    file or an ``imatrix`` artifact (its lineage flows on). ``split_max_size``: bytes of tensor data per
    file, written in llama.cpp's gguf-split format (``extra.file`` is then the first shard)."""
    from .imatrix import resolve_imatrix

    qname, ftype = resolve_ftype(qtype)
    if needs_imatrix(qname) and not imatrix:
        refuse_without_imatrix(qname)
    target = Path(src)
    gpath = resolve_gguf(target)
    info = read_gguf(gpath)  # bad/truncated input -> UserError before anything is written
    if is_quantized(info) and not allow_requantize:
        raise UserError(f"already quantized ({info['file_type']}): requantizing loses quality; "
                        "start from the f16/bf16/f32 GGUF or pass --allow-requantize", path=str(gpath))
    if name is not None and (not name.endswith(".gguf") or "/" in name):
        raise UserError("--name must be a file name ending in .gguf", field="--name")
    imatrix_file, imatrix_input = resolve_imatrix(imatrix) if imatrix else (None, None)
    imat = load_imatrix(imatrix_file) if imatrix else None
    if split_max_size is not None and split_max_size < 1:
        raise UserError("must be more than 0 bytes", field="--split-max-size")
    threads = default_threads(threads)
    inputs = [target if is_artifact(target) else gpath] + ([imatrix_input] if imatrix else [])
    params = {"q": qname, "imatrix": bool(imatrix), "allow_requantize": allow_requantize, "name": name}
    if split_max_size:
        params["split_max_size"] = split_max_size
    with Stage("gguf", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        fname = name or gguf_filename(info["metadata"], qname)
        dst = st.path(fname)
        result: dict = {}

        def work():
            try:
                result["rc"] = _quantize_call(gpath, dst, ftype, allow_requantize=allow_requantize,
                                              threads=threads, imatrix=imat)
            except Exception as e:  # noqa: BLE001 - reported below
                result["error"] = e

        t0 = time.monotonic()
        th = threading.Thread(target=work, daemon=True)
        total = _expected_bytes(info, qname)
        with progress(f"quantize {qname}", total=total, unit="bytes") as advance:
            th.start()
            done = 0
            while th.is_alive():
                th.join(0.25)
                now = min(dst.stat().st_size if dst.exists() else 0, total)
                if now > done:
                    advance(now - done)
                    done = now
            advance(max(0, total - done))
        if "error" in result or result.get("rc") != 0 or not dst.is_file():
            logtext = "".join(LOG_LINES)
            said = [ln.strip() for ln in logtext.splitlines() if ln.strip()][-1:]
            needs = [ln.split(":", 1)[1].strip() for ln in logtext.splitlines() if "offending tensor" in ln]
            if "requires an importance matrix" in logtext and not imatrix:
                raise UserError(f"{qname} needs an importance matrix (llama.cpp refuses to quantize "
                                f"{needs[0] if needs else 'a weight'} without one): compute one with "
                                "`tools imatrix F16.gguf --corpus CORPUS --out DIR` and pass --imatrix DIR",
                                field="--imatrix")
            raise WorkError(f"llama_model_quantize failed on {gpath} "
                            f"({result.get('error') or 'rc=' + str(result.get('rc'))}{': ' + said[0] if said else ''})")
        fallbacks = sum(1 for ln in "".join(LOG_LINES).splitlines() if "falling back" in ln)
        qinfo = read_gguf(dst)
        main = primary_tensor_type(qname)
        share = type_share(qinfo, main)
        st.extra.update({
            "file": fname, "source": "quantize", "requested_type": qname, "file_type": qinfo["file_type"],
            "architecture": qinfo["architecture"], "parameters": qinfo["parameters"],
            "tensor_types": qinfo["tensor_types"], "bits_per_weight": qinfo["bits_per_weight"],
            "matrix_bits_per_weight": qinfo["matrix_bits_per_weight"], "primary_type": main,
            "primary_type_share": round(share, 4), "size_bytes": qinfo["size_bytes"],
            "source_file": gpath.name, "source_size_bytes": info["size_bytes"],
            "imatrix": bool(imatrix), "fallback_tensors": fallbacks, "mostly_applied": share >= MOSTLY_APPLIED,
            "chat_template_present": bool(qinfo["chat_template"]),
        })
        if qinfo["chat_template"] != info["chat_template"]:
            raise WorkError("quantization changed or dropped the chat template")
        shards = [dst]
        if split_max_size and qinfo["size_bytes"] > split_max_size:
            shards = split_gguf(dst, split_max_size)
        st.extra["shards"] = [p.name for p in shards]
        st.extra["file"] = shards[0].name
        if len(shards) > 1:
            log(f"split into {len(shards)} shards of at most {split_max_size} bytes of tensor data "
                f"(llama.cpp loads {shards[0].name})")
        st.extra["seconds"] = round(time.monotonic() - t0, 2)
    return st.result


def describe_mix(tensor_types: dict) -> str:
    """'Q4_0 x120, Q5_1 x60, ...' sorted by element count."""
    items = sorted(tensor_types.items(), key=lambda kv: (-kv[1]["elements"], kv[0]))
    return ", ".join(f"{k} x{v['tensors']}" for k, v in items)


def warning_for(extra: dict) -> str | None:
    if extra.get("mostly_applied", True):
        return None
    return (f"warning: requested {extra['requested_type']} but only {100 * extra['primary_type_share']:.0f}% of the "
            f"weight-matrix elements are {extra['primary_type']} (rows not a multiple of the block size fall back "
            f"to other types); real mix: {describe_mix(extra['tensor_types'])}; effective "
            f"{extra['bits_per_weight']:.2f} bits per weight, while the header says {extra['file_type']}")


def quant_table_rows(arts: dict, compares: dict) -> list[dict]:
    rows = []
    for q, a in arts.items():
        e = a.extra
        c = compares.get(q)
        rows.append({"type": q, "file": f"{q}/{e['file']}", "size_bytes": e["size_bytes"],
                     "bits_per_weight": e["bits_per_weight"], "tensor_mix": describe_mix(e["tensor_types"]),
                     "primary_type_share": e["primary_type_share"],
                     "perplexity": c.extra["quant_perplexity"] if c else None,
                     "ref_perplexity": c.extra["ref_perplexity"] if c else None,
                     "mean_kl": c.extra["mean_kl"] if c else None,
                     "top1_agreement": c.extra["top1_agreement"] if c else None})
    return rows


def table_markdown(rows: list[dict], ref_name: str, tokens: int | None) -> str:
    L = [f"Quantized from `{ref_name}`; perplexity, mean KL(f16 || quant) and top-1 agreement on "
         f"{tokens if tokens is not None else 'n/a'} held-out tokens (PubMedQA test abstracts).", "",
         "| type | file | size | bits/weight | tensor mix | perplexity | mean KL | top-1 agreement |",
         "|---|---|---|---|---|---|---|---|"]
    ref_ppl = next((r["ref_perplexity"] for r in rows if r["ref_perplexity"] is not None), None)
    if ref_ppl is not None:
        L.append(f"| F16 (reference) | `{ref_name}` | | | | {ref_ppl:.3f} | 0 | 100% |")
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r["perplexity"] is not None else "n/a"
        kl = f"{r['mean_kl']:.5f}" if r["mean_kl"] is not None else "n/a"
        top = f"{100 * r['top1_agreement']:.1f}%" if r["top1_agreement"] is not None else "n/a"
        L.append(f"| {r['type']} | `{r['file'].split('/')[-1]}` | {r['size_bytes'] / 2**20:.1f} MiB | "
                 f"{r['bits_per_weight']:.2f} | {r['tensor_mix']} | {ppl} | {kl} | {top} |")
    return "\n".join(L) + "\n"


def quantize_set(src: str | os.PathLike, qtypes: list[str], out: str | os.PathLike, *,
                 imatrix: str | os.PathLike | None = None, allow_requantize: bool = False, threads: int | None = None,
                 text_file: str | os.PathLike | None = None, ctx: int = 256, max_tokens: int | None = 512,
                 n_gpu_layers: int | None = None, split_max_size: int | None = None, force: bool = False):
    """Several types in one call: artifact ``out`` (stage ``gguf.set``) holding one ``gguf`` artifact per
    type (``out/<TYPE>/<name>-<TYPE>.gguf``), a ``compare-quant`` artifact per type (``out/compare/<TYPE>``)
    and ``quant-table.json`` / ``quant-table.md``: size, bits/weight, the real tensor mix, perplexity
    and mean KL against the source on held-out text, top-1 agreement. llama.cpp's quantizer reads
    the source once per type (``llama_model_quantize`` takes a path)."""
    from tools.io import write_json

    from .imatrix import resolve_imatrix
    from .quantgap import compare_quant, heldout_text, read_text

    names = []
    for q in qtypes:
        n, _ = resolve_ftype(q)
        if n in names:
            raise UserError(f"type {n} given twice", field="--q")
        if needs_imatrix(n) and not imatrix:
            refuse_without_imatrix(n)
        names.append(n)
    if not names:
        raise UserError("no quantization type given", field="--q")
    target = Path(src)
    gpath = resolve_gguf(target)
    info = read_gguf(gpath, tensors=False)
    if text_file is not None:
        read_text(text_file)
    inputs = [target if is_artifact(target) else gpath] + ([resolve_imatrix(imatrix)[1]] if imatrix else []) + \
        ([Path(text_file)] if text_file else [])
    params = {"q": names, "imatrix": bool(imatrix), "allow_requantize": allow_requantize, "ctx": ctx,
              "max_tokens": max_tokens, "text": Path(text_file).name if text_file else "pubmedqa-test-heldout"}
    if split_max_size:
        params["split_max_size"] = split_max_size
    with Stage("gguf.set", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        text = Path(text_file) if text_file else st.path("heldout.txt")
        if not text_file:
            text.write_text(heldout_text(), encoding="utf-8")
        arts, comps = {}, {}
        for q in names:
            arts[q] = quantize_stage(gpath, q, st.path(q), imatrix=imatrix, allow_requantize=allow_requantize,
                                     threads=threads, split_max_size=split_max_size)
            warn = warning_for(arts[q].extra)
            if warn:
                log(warn)
            comps[q] = compare_quant(gpath, arts[q].path / arts[q].extra["file"], text, st.path(f"compare/{q}"),
                                     ctx=ctx, max_tokens=max_tokens, threads=threads, n_gpu_layers=n_gpu_layers)
        rows = quant_table_rows(arts, comps)
        tokens = next(iter(comps.values())).extra["tokens_scored"] if comps else None
        write_json(st.path("quant-table.json"), {"source": gpath.name, "source_file_type": info["file_type"],
                                                 "source_size_bytes": info["size_bytes"], "tokens_scored": tokens,
                                                 "rows": rows})
        st.path("quant-table.md").write_text(table_markdown(rows, gpath.name, tokens), encoding="utf-8")
        st.extra.update({"files": [r["file"] for r in rows], "types": names,
                         "shard_files": [f"{q}/{f}" for q in names
                                         for f in arts[q].extra.get("shards", [arts[q].extra["file"]])],
                         "table": rows, "source_file": gpath.name, "source": "quantize", "tokens_scored": tokens})
    return st.result


def default_out(model: Path, suffix: str) -> Path:
    """Beside MODEL: ``DIR-SUFFIX`` for an artifact folder, ``STEM-SUFFIX`` for a file."""
    parent = model if model.is_dir() else model.parent
    return parent.parent / f"{parent.name}-{suffix}" if model.is_dir() else parent / f"{model.stem}-{suffix}"


def quantize_many(model: str | os.PathLike, qtypes: str, out: str | os.PathLike | None = None, *,
                  name: str | None = None, imatrix: str | os.PathLike | None = None, allow_requantize: bool = False,
                  threads: int | None = None, text_file: str | os.PathLike | None = None, ctx: int = 256,
                  max_tokens: int = 512, split_max_size: str | None = None, force: bool = False):
    """`tools quantize`: one type (comma-free ``qtypes``) -> a ``gguf`` artifact; several -> a ``gguf.set``
    (one GGUF per type and the quant table)."""
    from .ggufinfo import parse_size

    model = Path(model)
    split = parse_size(split_max_size) if split_max_size is not None else None
    types = [t for t in (x.strip() for x in qtypes.split(",")) if t]
    if len(types) > 1:
        if name:
            raise UserError("--name names one file; with several types the names come from the GGUF", field="--name")
        return quantize_set(model, types, out or default_out(model, "set"), imatrix=imatrix,
                            allow_requantize=allow_requantize, threads=threads, text_file=text_file, ctx=ctx,
                            max_tokens=max_tokens, split_max_size=split, force=force)
    qname, _ = resolve_ftype(types[0] if types else qtypes)
    return quantize_stage(model, qname, out or default_out(model, qname), imatrix=imatrix,
                          allow_requantize=allow_requantize, name=name, threads=threads, split_max_size=split,
                          force=force)


def summary_lines(art) -> list[str]:
    """What `tools quantize` prints: the quant table of a set, or one GGUF's size, bits and tensor mix."""
    if art.stage == "gguf.set":
        return [(art.path / "quant-table.md").read_text(encoding="utf-8").rstrip("\n"),
                f"table: {art.path / 'quant-table.md'}"]
    e = art.extra
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    lines = [f"{art.path / e['file']}  {e['file_type']}  {mib(e['size_bytes'])} (from {mib(e['source_size_bytes'])})  "
             f"{e['bits_per_weight']:.2f} bits/weight", f"tensor types: {describe_mix(e['tensor_types'])}"]
    if len(e.get("shards", [])) > 1:
        lines.append(f"split into {len(e['shards'])} shards: {', '.join(e['shards'])} (load the first)")
    return lines
