"""HF -> GGUF with llama.cpp's own converter, matched to the llama.cpp that llama-cpp-python bundles.

``convert_hf_to_gguf.py`` is not an importable package. We use ``$LLAMA_CPP_DIR`` when set, else
the llama-cpp-python source distribution of the *installed* version, fetched from the package
index once and cached per version (only the converter, its ``conversion/`` package and the
vendored ``gguf-py`` are kept: PyPI's ``gguf`` is too old for this converter). No llama.cpp code
lives in this repository.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tools.errors import UserError, WorkError
from tools.progress import log

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def cache_root() -> Path:
    base = os.environ.get("MEDILORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "medilora")
    return Path(base)


def llama_cpp_version() -> str:
    from importlib.metadata import version
    return version("llama-cpp-python")


def llama_cpp_dir() -> Path:
    """A folder holding ``convert_hf_to_gguf.py`` and ``gguf-py`` for the installed llama.cpp."""
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        p = Path(env)
        if not (p / "convert_hf_to_gguf.py").is_file():
            raise UserError("LLAMA_CPP_DIR has no convert_hf_to_gguf.py", path=str(p), field="LLAMA_CPP_DIR")
        return p
    ver = llama_cpp_version()
    dest = cache_root() / f"llama.cpp-{ver}"
    if (dest / ".complete").is_file():
        return dest
    log(f"fetching llama.cpp's converter from the llama-cpp-python {ver} source distribution (once per version)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                            "--no-binary", ":all:", "-q", "-d", tmp],
                           capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise WorkError(f"could not fetch the llama-cpp-python {ver} sdist for its converter "
                            f"(set LLAMA_CPP_DIR to a llama.cpp checkout): {r.stderr.strip().splitlines()[-1:]}")
        prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
        stage = Path(tmp) / "out"
        with tarfile.open(sdists[0]) as tf:
            members = []
            for m in tf.getmembers():
                if m.name.startswith(prefix) and m.name[len(prefix):].startswith(KEEP) and (m.isfile() or m.isdir()):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tf.extractall(stage, members=members, filter="data")
        if not (stage / "convert_hf_to_gguf.py").is_file():
            raise WorkError(f"the llama-cpp-python {ver} sdist holds no convert_hf_to_gguf.py")
        (stage / ".complete").write_text(ver + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(stage, dest)
    return dest


def run_converter(script: str, args: list[str]) -> subprocess.CompletedProcess:
    d = llama_cpp_dir()
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # use the converter's own gguf-py, not PyPI's
    env["PYTHONPATH"] = os.pathsep.join([str(d / "gguf-py"), str(d)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return subprocess.run([sys.executable, str(d / script), *args], capture_output=True, text=True, env=env)


def convert_hf_to_gguf(model_dir: str | os.PathLike, outfile: str | os.PathLike, outtype: str = "f16",
                       model_name: str | None = None) -> Path:
    """Run llama.cpp's converter on an HF model folder; the GGUF appears at ``outfile`` only on success."""
    model_dir = Path(model_dir)
    if outtype not in OUTTYPES:
        raise UserError(f"unknown outtype {outtype!r} (one of {', '.join(OUTTYPES)})", field="--outtype")
    if not (model_dir / "config.json").is_file():
        raise UserError("not an HF model folder (no config.json)", path=str(model_dir))
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.parent / f".{outfile.name}.partial"
    args = [str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    if model_name:
        args += ["--model-name", model_name]
    r = run_converter("convert_hf_to_gguf.py", args)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise WorkError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir}: {tail[0]}")
    os.replace(tmp, outfile)
    return outfile


# -- the `tools convert` stage -----------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def hf_chat_template(model_dir: str | os.PathLike) -> str | None:
    """The chat template an HF tokenizer folder carries (chat_template.jinja or tokenizer_config.json)."""
    import json

    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cj = d / "chat_template.json"
    if cj.is_file():
        try:
            t = json.loads(cj.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise UserError("unreadable chat_template.json", path=str(cj)) from None
        if isinstance(t, str):
            return t
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as e:
            raise UserError(f"unreadable tokenizer_config.json ({e})", path=str(tc)) from None
        if isinstance(t, str):
            return t
        if isinstance(t, list):  # named templates: the default one
            for item in t:
                if isinstance(item, dict) and item.get("name") == "default":
                    return item.get("template")
    return None


def _model_inputs(model_dir: Path) -> list[Path]:
    """What a convert depends on: the artifact folder itself, or the files of a plain HF folder."""
    from tools.artifact import is_artifact

    if is_artifact(model_dir):
        return [model_dir]
    return sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def convert_stage(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", *,
                  force: bool = False):
    """HF folder -> artifact ``out`` (stage ``gguf``) holding ``<BaseName>-<Size>-<FineTune>-<TYPE>.gguf``.

    The GGUF must carry the HF tokenizer's chat template, byte for byte.
    """
    from tools.artifact import Stage
    from .ggufinfo import read_gguf, gguf_filename

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError("model folder not found", path=str(model_dir))
    if outtype not in OUTTYPES or outtype == "auto":
        raise UserError(f"unknown outtype {outtype!r} (one of f16, bf16, f32, q8_0)", field="--outtype")
    if not (model_dir / "config.json").is_file():
        raise UserError("not an HF model folder (no config.json)", path=str(model_dir))
    template = hf_chat_template(model_dir)
    if not template:
        raise UserError("the model's tokenizer has no chat template (every MediLoRA GGUF carries one); "
                        "add it to tokenizer_config.json or chat_template.jinja", path=str(model_dir))
    params = {"outtype": outtype, "converter": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {llama_cpp_version()})"}
    with Stage("gguf", out, params, inputs=_model_inputs(model_dir), force=force, log=log) as st:
        if st.skipped:
            return st.result
        log(f"converting {model_dir} to GGUF ({outtype}) with llama.cpp's converter")
        tmp = convert_hf_to_gguf(model_dir, st.path("model.gguf"), outtype)
        info = read_gguf(tmp)
        name = gguf_filename(info["metadata"], outtype)
        os.replace(tmp, st.path(name))
        if info["chat_template"] != template:
            raise WorkError("the GGUF's chat template differs from the tokenizer's "
                            f"({len(info['chat_template'] or '')} vs {len(template)} characters)")
        st.extra.update({"file": name, "architecture": info["architecture"], "file_type": info["file_type"],
                         "parameters": info["parameters"], "bits_per_weight": info["bits_per_weight"],
                         "tensor_types": info["tensor_types"], "chat_template_sha256": _sha(template),
                         "source": "convert"})
    return st.result


def _sha(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
