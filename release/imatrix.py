"""An importance matrix computed in-process on our own domain text, in llama.cpp's GGUF imatrix format.

llama-cpp-python ships no ``llama-imatrix`` binary, so this does what ``tools/imatrix/imatrix.cpp`` of
the bundled llama.cpp does, through the scheduler's eval callback (``llama_context_params.cb_eval``):
the scheduler asks, for every graph node, whether we want it (``ask=True``); we take the ``MUL_MAT``
nodes whose ``src0`` is a model weight (``blk.*``; ``output.weight`` with ``process_output``), with
an F32 ``src1`` of at least 16 rows, and every ``MUL_MAT_ID``. Once such a node is computed
(``ask=False``) its ``src1`` (the activations entering the weight) is copied out with
``ggml_backend_tensor_get`` and, per input feature, the sum of squares is added to ``<weight>.in_sum2``
and the number of activation rows (tokens) to ``<weight>.counts``. The text is cut into chunks of
``ctx`` tokens, each decoded from an empty cache with BOS in front when the model asks for one, and
with logits for every token (else the last layer's feed-forward sees only one row), as llama-imatrix
does. The result is written as llama-imatrix writes it (``general.type = imatrix``,
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``; raw sums and counts, float32).

``struct ggml_tensor`` is bound with ctypes exactly as ``ggml/include/ggml.h`` of the bundled llama.cpp
defines it; the binding is checked at the first node against libggml-base's own accessors
(``ggml_tensor_overhead``, ``ggml_get_name``, ``ggml_nelements``, ``ggml_nbytes``, ``ggml_op_desc``)
and the run fails with a WorkError instead of reading garbage if this build lays it out differently.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tools.artifact import Stage, is_artifact, read_artifact
from tools.errors import UserError, WorkError
from tools.ggufpath import default_threads, resolve_gguf
from tools.io import read_jsonl
from tools.llamacpp import load
from tools.progress import log, progress

from .ggufinfo import gguf_module, read_gguf

IMATRIX_FILE = "imatrix.gguf"
MIN_ROWS = 16  # llama-imatrix ignores mat-muls on fewer rows (single-token decodes)
GGML_TYPE_F32 = 0
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding[4]


class GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml/include/ggml.h (llama.cpp bundled with llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _tensor(addr: int) -> GGMLTensor:
    return ctypes.cast(addr, ctypes.POINTER(GGMLTensor)).contents


class _GGML:
    """libggml-base's accessors (loaded by llama_cpp already; CDLL returns the same library)."""

    def __init__(self):
        import llama_cpp

        libdir = Path(llama_cpp.__file__).parent / "lib"
        cands = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
        if not cands:
            raise WorkError(f"libggml-base not found beside llama_cpp ({libdir})")
        lib = ctypes.CDLL(str(cands[0]))
        P = ctypes.c_void_p
        for name, res, args in (
            ("ggml_op_name", ctypes.c_char_p, [ctypes.c_int]),
            ("ggml_op_desc", ctypes.c_char_p, [P]),
            ("ggml_get_name", ctypes.c_char_p, [P]),
            ("ggml_nelements", ctypes.c_int64, [P]),
            ("ggml_nrows", ctypes.c_int64, [P]),
            ("ggml_nbytes", ctypes.c_size_t, [P]),
            ("ggml_tensor_overhead", ctypes.c_size_t, []),
            ("ggml_backend_tensor_get", None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
            setattr(self, name, fn)
        ops = {}
        for i in range(64):  # MUL_MAT / MUL_MAT_ID sit near the start of enum ggml_op
            ops[self.ggml_op_name(i)] = i
            if b"MUL_MAT_ID" in ops:
                break
        if b"MUL_MAT" not in ops or b"MUL_MAT_ID" not in ops:
            raise WorkError("this ggml names no MUL_MAT / MUL_MAT_ID op")
        self.MUL_MAT, self.MUL_MAT_ID = ops[b"MUL_MAT"], ops[b"MUL_MAT_ID"]

    def tensor_bytes(self, addr: int) -> bytearray:
        """A copy of the tensor's data (host or device buffer)."""
        n = int(self.ggml_nbytes(addr))
        buf = bytearray(n)
        self.ggml_backend_tensor_get(addr, (ctypes.c_char * n).from_buffer(buf), 0, n)
        return buf


def filter_tensor_name(name: str) -> str:
    """``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight`` (llama-imatrix's filter_tensor_name)."""
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


class Collector:
    """What llama-imatrix's IMatrixCollector accumulates: per weight, sums of squared activations per
    input feature (one row per expert / matrix) and a count of activation rows."""

    def __init__(self, ggml: _GGML, process_output: bool = False):
        self.g = ggml
        self.process_output = process_output
        self.sums: dict = {}    # name -> float64 array (n_mat, ne0)
        self.counts: dict = {}  # name -> int64 array (n_mat,)
        self.error: BaseException | None = None
        self.checked = False
        self.calls = 0

    # -- the layout check, once, on the first MUL_MAT node ------------------------------------------
    def _check_layout(self, addr: int, t: GGMLTensor) -> None:
        g = self.g
        src0, src1 = _tensor(t.src[0]), _tensor(t.src[1])
        problems = []
        if g.ggml_tensor_overhead() - GGML_OBJECT_SIZE != ctypes.sizeof(GGMLTensor):
            problems.append(f"sizeof {ctypes.sizeof(GGMLTensor)} vs {g.ggml_tensor_overhead() - GGML_OBJECT_SIZE}")
        for a, x in ((addr, t), (t.src[0], src0), (t.src[1], src1)):
            if g.ggml_get_name(a) != x.name:
                problems.append(f"name {x.name!r} vs {g.ggml_get_name(a)!r}")
            n = 1
            for d in x.ne:
                n *= d
            if g.ggml_nelements(a) != n or min(x.ne) < 1:
                problems.append(f"ne {list(x.ne)} vs {g.ggml_nelements(a)} elements")
        if g.ggml_op_desc(addr) != b"MUL_MAT":
            problems.append(f"op {t.op} is {g.ggml_op_desc(addr)!r}")
        if src0.ne[0] != src1.ne[0] or t.ne[0] != src0.ne[1] or t.ne[1] != src1.ne[1]:
            problems.append(f"mat-mul shapes {list(src0.ne)} x {list(src1.ne)} -> {list(t.ne)}")
        if src1.type == GGML_TYPE_F32 and src1.nb[0] != 4:
            problems.append(f"F32 stride {src1.nb[0]}")
        if problems:
            raise WorkError("the ggml_tensor layout of this llama.cpp build differs from the one release/imatrix.py "
                            f"binds (ggml.h of llama-cpp-python 0.3.36): {'; '.join(problems)}")
        self.checked = True

    # -- the callback ---------------------------------------------------------------------------------
    def __call__(self, addr, ask, user_data):
        if self.error is not None:
            return False
        try:
            t = _tensor(addr)
            if ask:
                return self._wanted(addr, t)
            self._collect(addr, t)
            return True
        except BaseException as e:  # noqa: BLE001 - an exception must not cross into C
            self.error = e
            return False

    def _wanted(self, addr: int, t: GGMLTensor) -> bool:
        if t.op == self.g.MUL_MAT_ID:
            return True
        if t.op != self.g.MUL_MAT:
            return False
        if not self.checked:
            self._check_layout(addr, t)
        src1 = _tensor(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        wname = filter_tensor_name(_tensor(t.src[0]).name.decode("utf-8", "replace"))
        return wname.startswith("blk.") or (self.process_output and wname == "output.weight")

    def _array(self, addr: int, x: GGMLTensor):
        import numpy as np

        if x.type != GGML_TYPE_F32 or x.nb[0] != 4:
            raise WorkError(f"activations of {x.name!r} are not contiguous F32 rows")
        raw = np.frombuffer(self.g.tensor_bytes(addr), dtype=np.uint8)
        ne, nb = list(x.ne), list(x.nb)
        return np.lib.stride_tricks.as_strided(raw[: raw.size // 4 * 4].view(np.float32),
                                               shape=(ne[3], ne[2], ne[1], ne[0]),
                                               strides=(nb[3], nb[2], nb[1], nb[0]), writeable=False)

    def _entry(self, name: str, n_mat: int, ne0: int):
        import numpy as np

        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, ne0), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        elif self.sums[name].shape != (n_mat, ne0):
            raise WorkError(f"inconsistent size for {name}: {self.sums[name].shape} vs {(n_mat, ne0)}")
        return self.sums[name], self.counts[name]

    def _collect(self, addr: int, t: GGMLTensor) -> None:
        import numpy as np

        self.calls += 1
        src0 = _tensor(t.src[0])
        src1 = _tensor(t.src[1])
        wname = filter_tensor_name(src0.name.decode("utf-8", "replace"))
        x = self._array(t.src[1], src1).astype(np.float64)
        ne0 = int(src1.ne[0])
        if t.op == self.g.MUL_MAT_ID:
            # ids -> [n_expert_used, n_tokens]; src1 -> [cols, n_expert_used (or 1), n_tokens]
            ids_t = _tensor(t.src[2])
            n_as = int(src0.ne[2])
            if src1.ne[3] != 1:
                raise WorkError(f"tensor has more than 3 dimensions: {wname}")
            if ids_t.ne[1] != src1.ne[2]:
                raise WorkError(f"expert ids and activations disagree for {wname}")
            raw = np.frombuffer(self.g.tensor_bytes(t.src[2]), dtype=np.uint8)
            ids = np.lib.stride_tricks.as_strided(raw[: raw.size // 4 * 4].view(np.int32),
                                                  shape=(int(ids_t.ne[1]), int(ids_t.ne[0])),
                                                  strides=(ids_t.nb[1], ids_t.nb[0]), writeable=False)
            sums, counts = self._entry(wname, n_as, ne0)
            if ids.size and (ids.min() < 0 or ids.max() >= n_as):
                raise WorkError(f"expert id out of range for {wname}")
            n_tokens, n_ids = ids.shape
            for idx in range(n_ids):
                rows = x[0, :, idx % int(src1.ne[1]), :]  # (n_tokens, ne0)
                ex = ids[:, idx]
                np.add.at(sums, ex, rows * rows)
                np.add.at(counts, ex, 1)
        else:
            n_mat = int(src0.ne[2] * src0.ne[3])
            sums, counts = self._entry(wname, n_mat, ne0)
            sq = (x * x).sum(axis=2)  # (ne3, ne2, ne0): summed over the rows (tokens)
            for i3 in range(int(src1.ne[3])):
                for i2 in range(int(src1.ne[2])):
                    mat_id = (i3 % int(src0.ne[3])) * int(src0.ne[2]) + (i2 % int(src0.ne[2]))
                    sums[mat_id] += sq[i3, i2]
            counts += int(src1.ne[1] * src1.ne[2] * src1.ne[3]) // n_mat
        if not np.all(np.isfinite(sums)):
            raise WorkError(f"non-finite activations in {wname}")


@contextlib.contextmanager
def _eval_callback(cb):
    """``llama_context_default_params`` with ``cb_eval`` set, while llama_cpp.Llama builds its context."""
    import llama_cpp.llama_cpp as lc

    orig = lc.llama_context_default_params

    def params():
        p = orig()
        p.cb_eval = cb
        p.cb_eval_user_data = None
        return p

    lc.llama_context_default_params = params
    try:
        yield
    finally:
        lc.llama_context_default_params = orig


def corpus_text(corpus: str | os.PathLike) -> tuple[str, object]:
    """The texts of a ``corpus`` artifact (``corpus.jsonl``), in order, blank line between documents."""
    art = read_artifact(corpus, stage="corpus")
    texts = [str(r["text"]) for r in read_jsonl(art.file("corpus.jsonl"), required=("text",))]
    text = "\n\n".join(t.strip() for t in texts if t.strip())
    if not text:
        raise UserError("corpus holds no text", path=str(Path(corpus) / "corpus.jsonl"))
    return text, art


def write_imatrix(path: str | os.PathLike, sums: dict, counts: dict, *, datasets: list[str], chunk_count: int,
                  chunk_size: int) -> None:
    """llama-imatrix's GGUF format: per weight ``<name>.in_sum2`` (n_mat x ne0) and ``<name>.counts``
    (n_mat x 1), float32, names sorted; no architecture key."""
    import numpy as np

    g = gguf_module()
    w = g.GGUFWriter(str(path), arch="imatrix")
    w.remove_key(g.Keys.General.ARCHITECTURE)
    w.add_type(g.GGUFType.IMATRIX)
    w.add_array(g.Keys.IMatrix.DATASETS, list(datasets))
    w.add_uint32(g.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    w.add_uint32(g.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name in sorted(sums):
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums[name], dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(counts[name], dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def resolve_imatrix(target: str | os.PathLike) -> tuple[Path, Path]:
    """``--imatrix`` as a file or an ``imatrix`` artifact -> (the file, what to record as the stage input).
    A file inside an artifact folder records the folder, so its lineage (credentialed) flows on."""
    p = Path(target)
    if p.is_dir():
        art = read_artifact(p)
        files = sorted(o for o in art.outputs() if o.endswith((".gguf", ".dat")) and "/" not in o)
        if len(files) != 1:
            raise UserError(f"expected one imatrix file (.gguf or .dat) in the artifact, found {len(files)}",
                            path=str(p), field="--imatrix")
        return p / files[0], p
    if is_artifact(p.parent):
        return p, p.parent
    return p, p


@dataclass(frozen=True)
class ImatrixRun:
    """How the importance matrix is collected: ``chunks`` of ``ctx`` tokens (None: all the corpus holds),
    ``process_output`` (also output.weight, llama-imatrix's flag), llama.cpp threads and GPU layers."""
    chunks: int | None = None
    ctx: int = 512
    process_output: bool = False
    threads: int | None = None
    n_gpu_layers: int | None = None


def imatrix_stage(model: str | os.PathLike, corpus: str | os.PathLike, out: str | os.PathLike,
                  run: ImatrixRun = ImatrixRun(), *, force: bool = False):
    """Artifact ``out`` (stage ``imatrix``): ``imatrix.gguf`` from ``model`` (a GGUF or ``gguf`` artifact)
    run over the text of the ``corpus`` artifact. Lineage (credentialed for MIMIC) comes from the corpus."""
    import llama_cpp

    chunks, ctx, process_output, threads, n_gpu_layers = run.chunks, run.ctx, run.process_output, run.threads, \
        run.n_gpu_layers
    target = Path(model)
    gpath = resolve_gguf(target)
    info = read_gguf(gpath, tensors=False)
    if ctx < MIN_ROWS:
        raise UserError(f"must be at least {MIN_ROWS} (llama.cpp's imatrix skips smaller batches)", field="--ctx")
    if chunks is not None and chunks < 1:
        raise UserError("must be 1 or more", field="--chunks")
    text, cart = corpus_text(corpus)
    threads = default_threads(threads)
    params = {"chunks": chunks, "ctx": ctx, "process_output": process_output}
    inputs = [target if target.is_dir() else gpath, Path(corpus)]
    with Stage("imatrix", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        t0 = time.monotonic()
        ggml = _GGML()
        col = Collector(ggml, process_output=process_output)
        cb = llama_cpp.ggml_backend_sched_eval_callback(col)
        with _eval_callback(cb):
            llm = load(gpath, n_gpu_layers=n_gpu_layers, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                       n_threads=threads, n_threads_batch=threads, seed=0)
        try:
            n_train = llm._model.n_ctx_train()
            if ctx > n_train:
                raise UserError(f"larger than the model's training context ({n_train})", field="--ctx")
            add_bos = bool(llm._model.add_bos_token())
            bos = llm.token_bos()
            toks = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
            n_avail = len(toks) // ctx
            if n_avail < 1:
                raise UserError(f"corpus tokenizes to {len(toks)} tokens, fewer than one chunk of --ctx {ctx}",
                                path=str(corpus))
            n_chunks = min(chunks, n_avail) if chunks else n_avail
            if chunks and chunks > n_avail:
                log(f"imatrix: the corpus holds {n_avail} chunks of {ctx} tokens, not {chunks}: using {n_avail}")
            with progress("imatrix", total=n_chunks * ctx, unit="tokens") as advance:
                for i in range(n_chunks):
                    chunk = list(toks[i * ctx:(i + 1) * ctx])
                    if add_bos:
                        chunk[0] = bos
                    llm.reset()
                    llm.eval(chunk)
                    if col.error is not None:
                        break
                    advance(ctx)
        finally:
            llm.close()
            del cb
        if col.error is not None:
            if isinstance(col.error, (UserError, WorkError)):
                raise col.error
            raise WorkError(f"imatrix collection failed: {type(col.error).__name__}: {col.error}")
        if not col.sums:
            raise WorkError("no mat-mul activations were collected (no blk.* weights seen)")
        ds = [f"{cart.stage}:{Path(corpus).name}/corpus.jsonl"]
        write_imatrix(st.path(IMATRIX_FILE), col.sums, col.counts, datasets=ds, chunk_count=n_chunks, chunk_size=ctx)
        tokens = n_chunks * ctx
        short = sorted(k for k, c in col.counts.items() if int(c.max()) != tokens)
        st.extra.update({
            "file": IMATRIX_FILE, "model_file": gpath.name, "model_file_type": info["file_type"],
            "architecture": info["architecture"], "corpus_stage": cart.stage, "chunks": n_chunks, "ctx": ctx,
            "tokens": tokens, "corpus_tokens": len(toks), "entries": len(col.sums),
            "entries_short_of_tokens": short, "callbacks": col.calls,
            "seconds": round(time.monotonic() - t0, 2),
        })
    return st.result
