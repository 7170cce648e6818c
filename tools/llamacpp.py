"""Opening a GGUF with llama-cpp-python, the same way everywhere: CPU guard and GPU offload.

- **AMX guard.** llama.cpp's AMX backend (built when the compiler targets a CPU with AMX, e.g. a
  ``-march=native`` build on a Sapphire Rapids Xeon) repacks weights into an AMX buffer and
  segfaults on the first decode there (llama.cpp issue 20824; see docs/PORTABILITY.md). ``make
  install`` builds llama.cpp without AMX, so the guard is idle on our own build; for a
  llama-cpp-python built elsewhere (a user's wheel) that reports ``AMX_INT8 = 1`` on a CPU with
  AMX, models are loaded with ``use_extra_bufts = False`` (no extra buffer types: no AMX, and no
  other repacking either, which is slower but correct). ``MEDILORA_LLAMA_AMX=1`` lifts the guard.
- **GPU offload.** ``n_gpu_layers=None`` means every layer when llama.cpp has a GPU backend
  (``llama_supports_gpu_offload``), none otherwise; the value used is recorded by the callers.
"""
from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


@lru_cache(maxsize=1)
def system_info() -> str:
    """llama.cpp's own ``llama_print_system_info`` of the installed build."""
    import llama_cpp
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def built_with_amx(info: str) -> bool:
    return "AMX_INT8 = 1" in info


def amx_guard_needed(info: str, flags: set[str], env: dict | None = None) -> bool:
    """True when this llama.cpp build has its AMX path and this CPU would take it."""
    env = os.environ if env is None else env
    if env.get("MEDILORA_LLAMA_AMX") == "1":
        return False
    return built_with_amx(info) and bool({"amx_tile", "amx_int8"} & flags)


def gpu_offload_supported() -> bool:
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


def resolve_gpu_layers(n_gpu_layers: int | None) -> int:
    """``None`` -> all layers (-1) with a GPU backend, else 0; any other value as given."""
    if n_gpu_layers is None:
        return -1 if gpu_offload_supported() else 0
    return int(n_gpu_layers)


@contextlib.contextmanager
def _no_extra_bufts():
    import llama_cpp.llama_cpp as lc

    orig = lc.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = orig


def load(model_path: str | os.PathLike, *, n_gpu_layers: int | None = None, **kwargs):
    """``llama_cpp.Llama(model_path, ...)`` with the AMX guard and the GPU-layer default applied."""
    import llama_cpp

    kwargs.setdefault("verbose", False)
    ngl = resolve_gpu_layers(n_gpu_layers)
    guard = amx_guard_needed(system_info(), cpu_flags())
    with _no_extra_bufts() if guard else contextlib.nullcontext():
        llm = llama_cpp.Llama(model_path=str(model_path), n_gpu_layers=ngl, **kwargs)
    llm.medilora_load = {"n_gpu_layers": ngl, "amx_guard": guard}
    return llm
