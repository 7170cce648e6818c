"""llama.cpp's own Python tools (converters, ``gguf-py``), matched to the installed llama-cpp-python.

``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py`` are not importable packages. They come
from the llama-cpp-python source distribution of the *installed* version, which ``make install``
downloads (it builds llama.cpp from it) and unpacks here with ``python -m release.llamasrc unpack
SDIST``: the converter, its ``conversion/`` package and the vendored ``gguf-py`` (PyPI's ``gguf``
is too old for this converter) go to ``<venv>/share/medilora/llama.cpp-<version>``. No verb needs
the network afterwards. Search order: ``$LLAMA_CPP_DIR`` (a llama.cpp checkout), the venv copy,
the per-user cache (``$MEDILORA_CACHE``), and only then a download of the sdist (a venv that was
not made by ``make install``). No llama.cpp code lives in this repository.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from tools.errors import UserError, WorkError
from tools.progress import log

KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_version() -> str:
    return version("llama-cpp-python")


def cache_root() -> Path:
    if os.environ.get("MEDILORA_CACHE"):
        return Path(os.environ["MEDILORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "medilora"


def venv_root() -> Path:
    return Path(sys.prefix) / "share" / "medilora"


def _candidates(ver: str) -> list[Path]:
    return [venv_root() / f"llama.cpp-{ver}", cache_root() / f"llama.cpp-{ver}"]


def unpack_sdist(sdist: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract the converters and gguf-py of a llama-cpp-python sdist into ``dest`` (atomically)."""
    sdist, dest = Path(sdist), Path(dest)
    try:
        tf = tarfile.open(sdist)
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"not a readable llama-cpp-python sdist ({e})", path=str(sdist)) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tf, tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        stage = Path(tmp) / "out"
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/", 1)
            rest = parts[1] if len(parts) == 2 else ""
            if not rest.startswith("vendor/llama.cpp/"):
                continue
            rel = rest[len("vendor/llama.cpp/"):]
            if rel.startswith(KEEP) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        tf.extractall(stage, members=members, filter="data")
        if not (stage / "convert_hf_to_gguf.py").is_file():
            raise WorkError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        (stage / ".complete").write_text(sdist.name + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(stage, dest)
    return dest


def _download(ver: str, dest: Path) -> Path:
    log(f"fetching llama.cpp's converter from the llama-cpp-python {ver} source distribution "
        "(a venv not made by `make install`; once per version)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                            "--no-binary", ":all:", "-q", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise WorkError(f"llama.cpp's converter is not installed and the llama-cpp-python {ver} sdist could not be "
                            "fetched (run `make install`, or set LLAMA_CPP_DIR to a llama.cpp checkout): "
                            f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}")
        return unpack_sdist(sdists[0], dest)


def llama_cpp_dir(download: bool = True) -> Path:
    """A folder holding ``convert_hf_to_gguf.py`` and ``gguf-py`` for the installed llama.cpp."""
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        p = Path(env)
        if not (p / "convert_hf_to_gguf.py").is_file():
            raise UserError("LLAMA_CPP_DIR has no convert_hf_to_gguf.py", path=str(p), field="LLAMA_CPP_DIR")
        return p
    ver = llama_cpp_version()
    cands = _candidates(ver)
    for c in cands:
        if (c / ".complete").is_file():
            return c
    if not download:
        raise WorkError(f"llama.cpp's converter for llama-cpp-python {ver} is not installed (run `make install`)")
    return _download(ver, cands[-1])


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run one of llama.cpp's Python scripts with its own gguf-py first on the path."""
    d = llama_cpp_dir()
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # use the converter's own gguf-py, not PyPI's
    env["PYTHONPATH"] = os.pathsep.join([str(d / "gguf-py"), str(d)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return subprocess.run([sys.executable, str(d / script), *args], capture_output=True, text=True, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "unpack":
        print("usage: python -m release.llamasrc unpack SDIST", file=sys.stderr)
        return 2
    ver = llama_cpp_version()
    sdist = Path(argv[1])
    if f"-{ver}." not in sdist.name:
        print(f"error: {sdist}: not the sdist of the installed llama-cpp-python {ver}", file=sys.stderr)
        return 2
    dest = unpack_sdist(sdist, venv_root() / f"llama.cpp-{ver}")
    print(f"llama.cpp converters of llama-cpp-python {ver}: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
