"""Two rules every GGUF verb shares: which file of an artifact is the model, and how many threads.

- ``resolve_gguf``: a .gguf file, or a ``gguf`` artifact folder (``tools convert`` / ``tools quantize``)
  holding exactly one .gguf or one complete gguf-split set; for a split set it is the first shard, which
  is what llama.cpp loads (it finds the others beside it).
- ``default_threads``: ``OMP_NUM_THREADS`` when set, else the physical cores this process may use
  (hyper-threads do not help llama.cpp's matrix kernels).
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from tools.errors import UserError

GGUF_MAGIC = b"GGUF"
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_set(files: list[Path]) -> list[Path] | None:
    """The files in shard order when they are exactly one complete gguf-split set, else None."""
    ms = [SHARD_RE.match(f.name) for f in files]
    if not files or not all(ms):
        return None
    prefixes = {m["prefix"] for m in ms}
    counts = {int(m["count"]) for m in ms}
    nos = sorted(int(m["no"]) for m in ms)
    if len(prefixes) != 1 or len(counts) != 1 or nos != list(range(1, counts.pop() + 1)):
        return None
    return sorted(files, key=lambda f: int(SHARD_RE.match(f.name)["no"]))


def check_magic(path: Path, field: str | None = None) -> Path:
    """``path`` if it is a readable file starting with the GGUF magic, else one-line UserError."""
    if not path.exists():
        raise UserError("GGUF file not found", path=str(path), field=field)
    if path.is_dir():
        raise UserError("expected a .gguf file, got a directory", path=str(path), field=field)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise UserError(f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})", path=str(path),
                        field=field)
    return path


def gguf_shards(path: str | os.PathLike) -> list[Path]:
    """Every file of the model whose (first) file is ``path``: its gguf-split set in order, or ``[path]``."""
    p = Path(path)
    m = SHARD_RE.match(p.name)
    if not m:
        return [p]
    found = shard_set(sorted(p.parent.glob(f"{glob.escape(m['prefix'])}-*-of-{m['count']}.gguf")))
    if not found:
        raise UserError(f"incomplete gguf-split set: expected {int(m['count'])} shards named "
                        f"{m['prefix']}-NNNNN-of-{m['count']}.gguf beside it", path=str(p))
    return found


def resolve_gguf(target: str | os.PathLike, field: str | None = None) -> Path:
    """The .gguf llama.cpp should load for ``target`` (a file or a GGUF artifact folder), magic checked;
    any shard of a complete split set resolves to its first shard."""
    p = Path(target)
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        shards = shard_set(found) if len(found) > 1 else None
        if shards:
            p = shards[0]
        elif len(found) != 1:
            raise UserError(f"expected a .gguf file or a folder holding exactly one (or one split set), "
                            f"found {len(found)}", path=str(p), field=field)
        else:
            p = found[0]
    elif SHARD_RE.match(p.name) and p.exists():
        p = gguf_shards(p)[0]
    return check_magic(p, field)


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads don't help llama.cpp)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
    except OSError:
        pass
    n = len(cores) or allowed
    return max(1, min(n, allowed))


def default_threads(threads: int | None = None) -> int:
    """``threads`` if given, else ``OMP_NUM_THREADS`` when set to a positive number, else physical cores."""
    if threads:
        return int(threads)
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0] or 0)
    except ValueError:
        omp = 0
    return omp if omp > 0 else physical_cores()
