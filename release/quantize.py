"""GGUF -> quantized GGUF, in-process through ``llama_cpp.llama_model_quantize``.

Any llama.cpp type name is accepted. llama.cpp silently falls back to other tensor types where a
row is not a multiple of the type's block (256 for k-quants): the report gives the real tensor-type
mix and the effective bits per weight, and warns when the requested type was mostly not applied.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tools.artifact import Stage, is_artifact
from tools.errors import UserError, WorkError
from tools.ggufpath import default_threads, resolve_gguf
from tools.io import write_json
from tools.progress import log, progress

from .fit import memory_figures
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
from .quantgap import Scoring, compare_quant, heldout_text, read_text

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


@dataclass(frozen=True)
class QuantOptions:
    """How one GGUF is quantized. ``imatrix``: a file or an ``imatrix`` artifact (its lineage flows on).
    ``overrides``: llama.cpp tensor-type overrides, ``((regex, ggml type), ...)`` (``llama-quantize
    --tensor-type``; the first pattern that matches a tensor's name wins, llama.cpp still falls back where a
    row does not fit the type's block). ``split_max_size``: bytes of tensor data per file, written in
    llama.cpp's gguf-split format. ``name``: the output file name."""
    imatrix: str | os.PathLike | None = None
    allow_requantize: bool = False
    threads: int | None = None
    name: str | None = None
    split_max_size: int | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    label: str | None = None


def _imatrix_array(imatrix: dict, keep: list):
    import llama_cpp
    import numpy as np

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
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def _overrides_array(overrides, keep: list):
    """``llama_model_tensor_override[]`` (pattern, ggml type), terminated by a null pattern."""
    import llama_cpp

    g = gguf_module()
    arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, tname) in enumerate(overrides):
        cpat = ctypes.c_char_p(pattern.encode("utf-8"))
        keep.append(cpat)
        arr[i].pattern = cpat.value
        arr[i].type = int(g.GGMLQuantizationType[tname])
    arr[len(overrides)].pattern = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))


def _quantize_call(src: Path, dst: Path, ftype: int, *, allow_requantize: bool, threads: int,
                   imatrix: dict | None, overrides=(), dry_run: bool = False) -> int:
    """``llama_model_quantize`` with llama.cpp's own parameters; its log goes to ``LOG_LINES``. ``dry_run``:
    llama.cpp decides every tensor's type and logs it, writing nothing (see :func:`plan`)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = allow_requantize
    params.dry_run = dry_run
    keep: list = []
    if imatrix:
        params.imatrix = _imatrix_array(imatrix, keep)
    if overrides:
        params.tt_overrides = _overrides_array(overrides, keep)
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


_PLAN_RE = re.compile(r"\]\s+(\S+)\s+-\s+\[([^\]]*)\], type =\s*(\S+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\S+)\))?")


def plan(src: Path, qtype: str, *, overrides=(), imatrix: dict | None = None, threads: int = 1) -> dict:
    """What llama.cpp would write, without writing it (its dry run): each tensor's type, the exact tensor
    bytes (rows x llama.cpp's row size of that type) and whether the mix needs an importance matrix."""
    g = gguf_module()
    _, ftype = resolve_ftype(qtype)
    rc = _quantize_call(Path(src), Path(src).with_suffix(".dry-run"), ftype, allow_requantize=False, threads=threads,
                        imatrix=imatrix, overrides=overrides, dry_run=True)
    text = "".join(LOG_LINES)
    if rc != 0:
        raise WorkError(f"llama.cpp's dry run of {qtype} failed on {src}")
    types, nbytes = {}, 0
    for m in _PLAN_RE.finditer(text):
        name, shape = m.group(1), [int(x) for x in m.group(2).replace(" ", "").split(",") if x]
        t = (m.group(4) or m.group(3)).upper()
        types[name] = t
        block, tbytes = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[t]]
        rows = 1
        for d in shape[1:]:
            rows *= d
        nbytes += rows * (shape[0] // block) * tbytes
    if not types:
        raise WorkError(f"llama.cpp's dry run of {qtype} logged no tensors (log format changed?)")
    return {"types": types, "tensor_bytes": nbytes, "needs_imatrix": "will require an imatrix" in text}


def _expected_bytes(info: dict, qtype: str) -> int:
    """A rough size of the output (for the progress bar): weight matrices at the requested type."""
    g = gguf_module()
    try:
        block, tbytes = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[primary_tensor_type(qtype)]]
    except KeyError:
        block, tbytes = 1, 2
    mat = sum(h["elements"] for k, h in info["tensor_types"].items())
    return max(1, int(mat * tbytes / block))


def _check_source(src: Path, qname: str, opts: QuantOptions) -> tuple[Path, dict]:
    if needs_imatrix(qname) and not opts.imatrix:
        refuse_without_imatrix(qname)
    gpath = resolve_gguf(src)
    info = read_gguf(gpath)  # bad/truncated input -> UserError before anything is written
    if is_quantized(info) and not opts.allow_requantize:
        raise UserError(f"already quantized ({info['file_type']}): requantizing loses quality; "
                        "start from the f16/bf16/f32 GGUF or pass --allow-requantize", path=str(gpath))
    if opts.name is not None and (not opts.name.endswith(".gguf") or "/" in opts.name):
        raise UserError("--name must be a file name ending in .gguf", field="--name")
    if opts.split_max_size is not None and opts.split_max_size < 1:
        raise UserError("must be more than 0 bytes", field="--split-max-size")
    return gpath, info


def _run_quantize(gpath: Path, dst: Path, ftype: int, qname: str, opts: QuantOptions, imat, total: int) -> None:
    """The quantization in a thread, the output file's growth as progress; a failure -> one clear error."""
    result: dict = {}

    def work():
        try:
            result["rc"] = _quantize_call(gpath, dst, ftype, allow_requantize=opts.allow_requantize,
                                          threads=default_threads(opts.threads), imatrix=imat,
                                          overrides=opts.overrides)
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    th = threading.Thread(target=work, daemon=True)
    with progress(f"quantize {opts.label or qname}", total=total, unit="bytes") as advance:
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
        if "requires an importance matrix" in logtext and not imat:
            raise UserError(f"{qname} needs an importance matrix (llama.cpp refuses to quantize "
                            f"{needs[0] if needs else 'a weight'} without one): compute one with "
                            "`tools imatrix F16.gguf --corpus CORPUS --out DIR` and pass --imatrix DIR",
                            field="--imatrix")
        raise WorkError(f"llama_model_quantize failed on {gpath} "
                        f"({result.get('error') or 'rc=' + str(result.get('rc'))}{': ' + said[0] if said else ''})")


def _describe(fname: str, qname: str, qinfo: dict, info: dict, gpath: Path, opts: QuantOptions) -> dict:
    fallbacks = sum(1 for ln in "".join(LOG_LINES).splitlines() if "falling back" in ln)
    main = primary_tensor_type(qname)
    share = type_share(qinfo, main)
    return {"file": fname, "source": "quantize", "requested_type": qname, "file_type": qinfo["file_type"],
            "architecture": qinfo["architecture"], "parameters": qinfo["parameters"],
            "tensor_types": qinfo["tensor_types"], "bits_per_weight": qinfo["bits_per_weight"],
            "matrix_bits_per_weight": qinfo["matrix_bits_per_weight"], "primary_type": main,
            "primary_type_share": round(share, 4), "size_bytes": qinfo["size_bytes"],
            "source_file": gpath.name, "source_size_bytes": info["size_bytes"],
            "imatrix": bool(opts.imatrix), "fallback_tensors": fallbacks, "mostly_applied": share >= MOSTLY_APPLIED,
            "chat_template_present": bool(qinfo["chat_template"]), "memory": memory_figures(qinfo),
            "overrides": [list(o) for o in opts.overrides], "recipe": opts.label or qname}


def quantize_stage(src: str | os.PathLike, qtype: str, out: str | os.PathLike, opts: QuantOptions = QuantOptions(), *,
                   force: bool = False):
    """Quantize ``src`` (.gguf or a ``gguf`` artifact) into artifact ``out`` (stage ``gguf``) as ``opts`` says.
    With ``split_max_size`` the file is cut into gguf-split shards (``extra.file`` is then the first)."""
    from .imatrix import resolve_imatrix  # lazy: `tools --help` imports this module (release.cli)

    qname, ftype = resolve_ftype(qtype)
    target = Path(src)
    gpath, info = _check_source(target, qname, opts)
    imatrix_file, imatrix_input = resolve_imatrix(opts.imatrix) if opts.imatrix else (None, None)
    imat = load_imatrix(imatrix_file) if opts.imatrix else None
    inputs = [target if is_artifact(target) else gpath] + ([imatrix_input] if opts.imatrix else [])
    params = {"q": qname, "imatrix": bool(opts.imatrix), "allow_requantize": opts.allow_requantize, "name": opts.name}
    if opts.split_max_size:
        params["split_max_size"] = opts.split_max_size
    if opts.overrides:
        params["overrides"] = [list(o) for o in opts.overrides]
    with Stage("gguf", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        fname = opts.name or gguf_filename(info["metadata"], qname)
        dst = st.path(fname)
        t0 = time.monotonic()
        _run_quantize(gpath, dst, ftype, qname, opts, imat, _expected_bytes(info, qname))
        qinfo = read_gguf(dst)
        st.extra.update(_describe(fname, qname, qinfo, info, gpath, opts))
        if qinfo["chat_template"] != info["chat_template"]:
            raise WorkError("quantization changed or dropped the chat template")
        shards = [dst]
        if opts.split_max_size and qinfo["size_bytes"] > opts.split_max_size:
            shards = split_gguf(dst, opts.split_max_size)
        st.extra["shards"] = [p.name for p in shards]
        st.extra["file"] = shards[0].name
        if len(shards) > 1:
            log(f"split into {len(shards)} shards of at most {opts.split_max_size} bytes of tensor data "
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


def quantize_set(src: str | os.PathLike, qtypes: list[str], out: str | os.PathLike, opts: QuantOptions = QuantOptions(),
                 scoring: Scoring = Scoring(ctx=256, max_tokens=512), *, text_file: str | os.PathLike | None = None,
                 force: bool = False):
    """Several types in one call: artifact ``out`` (stage ``gguf.set``) holding one ``gguf`` artifact per
    type (``out/<TYPE>/<name>-<TYPE>.gguf``), a ``compare-quant`` artifact per type (``out/compare/<TYPE>``)
    and ``quant-table.json`` / ``quant-table.md``: size, bits/weight, the real tensor mix, perplexity
    and mean KL against the source on held-out text, top-1 agreement. llama.cpp's quantizer reads
    the source once per type (``llama_model_quantize`` takes a path)."""
    from .imatrix import resolve_imatrix  # lazy: `tools --help` imports this module (release.cli)

    names = []
    for q in qtypes:
        n, _ = resolve_ftype(q)
        if n in names:
            raise UserError(f"type {n} given twice", field="--q")
        if needs_imatrix(n) and not opts.imatrix:
            refuse_without_imatrix(n)
        names.append(n)
    if not names:
        raise UserError("no quantization type given", field="--q")
    target = Path(src)
    gpath = resolve_gguf(target)
    info = read_gguf(gpath, tensors=False)
    if text_file is not None:
        read_text(text_file)
    inputs = [target if is_artifact(target) else gpath] + ([resolve_imatrix(opts.imatrix)[1]] if opts.imatrix else []) + \
        ([Path(text_file)] if text_file else [])
    params = {"q": names, "imatrix": bool(opts.imatrix), "allow_requantize": opts.allow_requantize, "ctx": scoring.ctx,
              "max_tokens": scoring.max_tokens, "text": Path(text_file).name if text_file else "pubmedqa-test-heldout"}
    if opts.split_max_size:
        params["split_max_size"] = opts.split_max_size
    with Stage("gguf.set", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        text = Path(text_file) if text_file else st.path("heldout.txt")
        if not text_file:
            text.write_text(heldout_text(), encoding="utf-8")
        arts, comps = {}, {}
        for q in names:
            arts[q] = quantize_stage(gpath, q, st.path(q), replace(opts, name=None))
            warn = warning_for(arts[q].extra)
            if warn:
                log(warn)
            comps[q] = compare_quant(gpath, arts[q].path / arts[q].extra["file"], text, st.path(f"compare/{q}"),
                                     scoring)
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


def quantize_many(model: str | os.PathLike, qtypes: str, out: str | os.PathLike | None = None,
                  opts: QuantOptions = QuantOptions(), scoring: Scoring = Scoring(ctx=256, max_tokens=512), *,
                  text_file: str | os.PathLike | None = None, force: bool = False):
    """`tools quantize`: one type (comma-free ``qtypes``) -> a ``gguf`` artifact; several -> a ``gguf.set``
    (one GGUF per type and the quant table)."""
    model = Path(model)
    types = [t for t in (x.strip() for x in qtypes.split(",")) if t]
    if len(types) > 1:
        if opts.name:
            raise UserError("--name names one file; with several types the names come from the GGUF", field="--name")
        return quantize_set(model, types, out or default_out(model, "set"), opts, scoring, text_file=text_file,
                            force=force)
    qname, _ = resolve_ftype(types[0] if types else qtypes)
    return quantize_stage(model, qname, out or default_out(model, qname), opts, force=force)


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
