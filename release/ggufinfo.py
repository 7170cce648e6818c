"""Read GGUF files (metadata, tensor-type mix, effective bits per weight) and name them.

Reading goes through llama.cpp's own ``gguf-py`` vendored with the installed llama-cpp-python
(see ``release.llamasrc``): PyPI's ``gguf`` lags behind and does not know every tensor type the
bundled llama.cpp writes. It is loaded in isolation, so a PyPI ``gguf`` that transformers imported
in the same process is left as it was. Without it we fall back to PyPI's.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

from tools.errors import UserError, WorkError
from tools.ggufpath import check_magic, gguf_shards


@lru_cache(maxsize=1)
def gguf_module():
    """llama.cpp's vendored ``gguf`` package, imported without disturbing ``sys.modules['gguf']``."""
    from .llamasrc import llama_cpp_dir  # lazy: `tools --help` imports this module; llamasrc pulls tarfile, subprocess

    try:
        d = llama_cpp_dir() / "gguf-py"
    except (UserError, WorkError):
        d = None
    if d is None or not (d / "gguf" / "__init__.py").is_file():
        import gguf  # PyPI's: fine for reading all but the newest tensor types
        return gguf
    saved = {k: v for k, v in sys.modules.items() if k == "gguf" or k.startswith("gguf.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(d))
    try:
        mod = importlib.import_module("gguf")
    finally:
        sys.path.remove(str(d))
        for k in [k for k in sys.modules if k == "gguf" or k.startswith("gguf.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return mod


def ftype_names() -> dict[str, int]:
    """Every llama.cpp file type the installed llama-cpp-python knows: name -> LLAMA_FTYPE value."""
    import llama_cpp

    names = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            names[attr[len("LLAMA_FTYPE_MOSTLY_"):]] = int(getattr(llama_cpp, attr))
    names["F32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    return names


# llama-quantize's aliases (tools/quantize/quantize.cpp)
FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def ftype_name(value: int | None) -> str:
    if value is None:
        return "unknown"
    for name, v in ftype_names().items():
        if v == value:
            return name
    return f"unknown ({value})"


def resolve_ftype(name: str) -> tuple[str, int]:
    """A llama.cpp type name (case-insensitive, llama-quantize's aliases too) -> (NAME, ftype)."""
    names = ftype_names()
    key = name.strip().upper()
    key = FTYPE_ALIASES.get(key, key)
    if key not in names:
        raise UserError(f"unknown quantization type {name!r}; llama.cpp knows: {', '.join(sorted(names))}",
                        field="--q")
    return key, names[key]


def primary_tensor_type(ftype: str) -> str:
    """The ggml tensor type a file type is mostly made of (Q3_K_L -> Q3_K, IQ3_M -> IQ3_S)."""
    special = {"IQ3_XS": "IQ3_S", "IQ3_M": "IQ3_S", "IQ2_M": "IQ2_S", "MXFP4_MOE": "MXFP4"}
    if ftype in special:
        return special[ftype]
    types = {t.name for t in gguf_module().GGMLQuantizationType}
    if ftype in types:
        return ftype
    base = ftype.rsplit("_", 1)[0]
    return base if base in types else ftype


def _field_value(field, gguf):
    """A metadata field as a Python value (arrays of strings/numbers as lists)."""
    T = gguf.GGUFValueType
    if not field.types:
        return None
    if field.types[0] == T.ARRAY:
        n = len(field.data)
        if n > 64:  # token lists, merges: summarised (reading them all is slow and unreadable)
            kind = field.types[-1].name.lower() if len(field.types) > 1 else "value"
            return f"<array of {n} {kind}>"
    return field.contents()


def _reader(path: Path, gguf):
    check_magic(path)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/IndexError/... on bad bytes
        raise UserError(f"truncated or corrupt GGUF ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                        path=str(path)) from None


def read_gguf(path: str | os.PathLike, *, tensors: bool = True) -> dict:
    """Everything ``inspect`` shows, as plain data (a split model: metadata of the first shard, tensors and
    size of all). Bad or truncated files -> UserError."""
    path = Path(path)
    gguf = gguf_module()
    reader = _reader(path, gguf)
    meta: dict = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = _field_value(field, gguf)
        except Exception:  # noqa: BLE001 - one odd field should not hide the rest
            meta[key] = "<unreadable>"
    hist: dict[str, dict] = {}
    total_elems = total_bytes = 0
    mat_elems = mat_bytes = 0
    size = n_tensors = 0
    tlist = []
    for shard in gguf_shards(path):
        reader = reader if shard == path else _reader(shard, gguf)
        end, shard_size = 0, shard.stat().st_size
        size += shard_size
        n_tensors += len(reader.tensors)
        for t in reader.tensors:
            tname = t.tensor_type.name
            n_el, n_b = int(t.n_elements), int(t.n_bytes)
            end = max(end, int(t.data_offset) + n_b)
            h = hist.setdefault(tname, {"tensors": 0, "elements": 0, "bytes": 0})
            h["tensors"] += 1
            h["elements"] += n_el
            h["bytes"] += n_b
            total_elems += n_el
            total_bytes += n_b
            if len([d for d in t.shape if int(d) > 1]) >= 2:
                mat_elems += n_el
                mat_bytes += n_b
            if tensors:
                tlist.append({"name": t.name, "type": tname, "shape": [int(d) for d in t.shape]})
        if end > shard_size:
            raise UserError(f"truncated GGUF: tensor data needs {end} bytes, file has {shard_size}", path=str(shard))
    ft = meta.get("general.file_type")
    info = {
        "file": path.name,
        "size_bytes": size,
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "file_type": ftype_name(int(ft)) if isinstance(ft, (int, float)) else "unknown",
        "tensor_count": n_tensors,
        "parameters": total_elems,
        "tensor_types": dict(sorted(hist.items())),
        "bits_per_weight": round(8 * total_bytes / total_elems, 4) if total_elems else None,
        "matrix_bits_per_weight": round(8 * mat_bytes / mat_elems, 4) if mat_elems else None,
        "chat_template": meta.get("tokenizer.chat_template"),
        "metadata": meta,
    }
    if tensors:
        info["tensors"] = tlist
    return info


def type_share(info: dict, tensor_type: str) -> float:
    """Share of the weight-matrix elements stored as ``tensor_type`` (by element count)."""
    # 1-D tensors (norms) are never quantized; count only tensors llama.cpp may quantize.
    elems = 0
    hit = 0
    for t in info.get("tensors", []):
        if len([d for d in t["shape"] if d > 1]) < 2:
            continue
        n = 1
        for d in t["shape"]:
            n *= d
        elems += n
        if t["type"] == tensor_type:
            hit += n
    return hit / elems if elems else 0.0


def is_quantized(info: dict) -> bool:
    """True when a weight matrix is stored in anything but F32/F16/BF16."""
    for t in info.get("tensors", []):
        if len([d for d in t["shape"] if d > 1]) >= 2 and t["type"] not in ("F32", "F16", "BF16"):
            return True
    return False


def _clean(part) -> str:
    s = "".join(c if (c.isalnum() or c in ".") else "-" for c in str(part).strip())
    return "-".join(p for p in s.split("-") if p)


def gguf_filename(meta: dict, encoding: str) -> str:
    """The GGUF naming convention: ``<BaseName>-<SizeLabel>-<FineTune>-<Version>-<Encoding>.gguf``."""
    parts = []
    base = meta.get("general.basename") or meta.get("general.name") or "model"
    parts.append(_clean(base) or "model")
    for key in ("general.size_label", "general.finetune", "general.version"):
        v = meta.get(key)
        if v:
            c = _clean(v)
            if c and c.lower() not in parts[0].lower().split("-"):
                parts.append(c)
    parts.append(encoding.upper())
    return "-".join(parts) + ".gguf"


_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, field: str = "--split-max-size") -> int:
    """``50G``, ``500M``, ``1.5GB``, ``2GiB`` or plain bytes -> bytes (M and G are decimal, as in gguf-split)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"not a size: {text!r} (e.g. 50G, 500M, 2GiB or a number of bytes)", field=field)
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise UserError("must be more than 0 bytes", field=field)
    return n


def split_gguf(src: str | os.PathLike, max_bytes: int) -> list[Path]:
    """Cut ``src`` into llama.cpp's gguf-split format beside it (``<stem>-00001-of-0000N.gguf``; every shard
    has ``split.no`` / ``split.count`` / ``split.tensors.count``, the first one all the metadata, tensors
    in file order), like ``llama-gguf-split --split --split-max-size``: at most ``max_bytes`` of tensor
    data per shard (a shard holds at least one tensor; the first also carries the metadata). ``src`` is
    removed once the shards are written. A file whose tensors fit stays as it is: ``[src]``."""
    src = Path(src)
    g = gguf_module()
    reader = g.GGUFReader(str(src), "r")
    arch = reader.fields.get(g.Keys.General.ARCHITECTURE)
    w = g.GGUFWriter(src, arch=arch.contents() if arch else "llama", split_max_size=max_bytes)
    w.data_alignment = reader.alignment
    for field in reader.fields.values():
        if field.name == g.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "split.")):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == g.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    if len(w.tensors) == 1:
        return [src]
    names = w.format_shard_names(src)
    try:
        w.write_header_to_file()  # opens every shard (the shard names differ from src)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            w.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        w.close()
    except BaseException:
        for n in names:
            n.unlink(missing_ok=True)
        raise
    n_tensors = len(reader.tensors)
    del reader
    seen = 0
    for i, n in enumerate(names):
        r = g.GGUFReader(str(n), "r")
        sizes = [int(t.n_bytes) for t in r.tensors]
        seen += len(sizes)
        if (int(r.fields["split.no"].contents()) != i or int(r.fields["split.count"].contents()) != len(names)
                or (len(sizes) > 1 and sum(sizes) > max_bytes)):
            raise WorkError(f"gguf-split wrote an inconsistent shard {n.name}")
    if seen != n_tensors:
        raise WorkError(f"the shards hold {seen} tensors, the source {n_tensors}")
    src.unlink()
    return names


def describe_lines(info: dict) -> list[str]:
    """`tools inspect`: a GGUF's architecture, type, tensor-type histogram, chat template and metadata."""
    lines = [f"file          {info['file']}  ({info['size_bytes'] / 2**20:.1f} MiB)",
             f"architecture  {info['architecture']}", f"name          {info['name']}",
             f"file type     {info['file_type']}", f"parameters    {info['parameters']:,}",
             f"bits/weight   {info['bits_per_weight']} (weight matrices {info['matrix_bits_per_weight']})",
             "tensor types:"]
    for t, h in sorted(info["tensor_types"].items(), key=lambda kv: -kv[1]["elements"]):
        share = h["elements"] / info["parameters"] if info["parameters"] else 0
        lines.append(f"  {t:<8} {h['tensors']:>5} tensors  {h['elements']:>14,} weights  {100 * share:5.1f}%")
    lines += ["chat template:", "  " + (info["chat_template"] or "(none)").replace("\n", "\n  "), "metadata:"]
    lines += [f"  {k} = {v}" for k, v in sorted(info["metadata"].items()) if k != "tokenizer.chat_template"]
    lines += [f"  {t['name']:<40} {t['type']:<8} {t['shape']}" for t in info.get("tensors", [])]
    return lines
