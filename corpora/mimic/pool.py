"""Tasks (CSV blocks, database batches) -> the JSONL, in task order: forked workers clean the notes
and spool their output (``/dev/shm``); the main process drops duplicates (first one wins) and copies
the kept byte ranges to the output with ``sendfile``. At most ``2 x workers`` tasks are in flight."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
from collections import Counter, deque
from itertools import accumulate
from pathlib import Path
from typing import Iterator

from tools.errors import UserError

from .csv_source import arrow_rows, close_files, python_rows, read_range
from .notes import NoteOptions, clean_note

# -- worker side --------------------------------------------------------------------------------
_OPTS: NoteOptions | None = None
_SPOOL: str | None = None       # pool workers leave their output here instead of in the pipe
_SEQ = [0]


def _init_worker(opts: NoteOptions, spool: str | None = None) -> None:
    global _OPTS, _SPOOL
    _OPTS, _SPOOL = opts, spool


def _pack(out: list, stats: Counter, newlines: int = 0):
    """("ok", hashes, byte size of each line, length bucket of each note, one UTF-8 blob of the
    lines (or the file it was spooled to), stats, newlines in the input block, id hashes)."""
    text = "".join(r[1] + "\n" for r in out)
    blob = text.encode("utf-8")
    if text.isascii():
        sizes = [len(r[1]) + 1 for r in out]
    else:
        sizes = [len(r[1].encode("utf-8")) + 1 for r in out]
    buckets = [max(0, r[2].bit_length() - 1) for r in out]
    if _SPOOL is not None and blob:  # a file: the main process copies it in-kernel
        _SEQ[0] += 1
        name = os.path.join(_SPOOL, f"{os.getpid()}-{_SEQ[0]}.part")
        with open(name, "wb") as fh:
            fh.write(blob)
        blob = name
    return ("ok", [r[0] for r in out], sizes, buckets, blob, stats, newlines, [r[3] for r in out])


def _work(task):
    """Process one task; returns _pack(...) or ("error", message, line within the block)."""
    opts = _OPTS
    stats: Counter = Counter()
    out = []
    if task[0] == "rows":
        version = task[2] if len(task) > 2 else "iii"
        for row in task[1]:
            r = clean_note(*row, opts, stats, version)
            if r is not None:
                out.append(r)
        return _pack(out, stats)
    if task[0] == "range":
        _, path, offset, length, cols = task
        data = read_range(path, offset, length)
    else:
        _, data, cols = task
    stats["bytes"] += len(data)
    rows = arrow_rows(data, cols)
    if rows is None:  # Arrow refused the block: the strict Python reader names the bad line
        rows = python_rows(data, cols)
        if rows[0] == "error":
            return rows
    version = cols.get("_version", "iii")
    for row in rows:
        r = clean_note(*row, opts, stats, version)
        if r is not None:
            out.append(r)
    return _pack(out, stats, data.count(b"\n"))


# -- main process --------------------------------------------------------------------------------
def _repeats(hashes: list, ids: list, seen: set | None, seen_ids: set, refuse=None) -> tuple[list[int], int, int]:
    """(positions to drop, exact duplicates, repeated ids) of one block's notes, the first copy winning;
    ``seen`` None: no text dedup (--no-dedup), ids are still one a note. ``refuse(i)`` raises for a repeated id."""
    dropped: list[int] = []
    n_dup = n_dup_id = 0
    if not hashes:
        return dropped, 0, 0
    block, id_block = set(hashes), set(ids)
    if ((seen is None or (len(block) == len(hashes) and seen.isdisjoint(block)))
            and len(id_block) == len(ids) and seen_ids.isdisjoint(id_block)):
        if seen is not None:  # the usual case: no duplicate, no loop over notes
            seen.update(block)
        seen_ids.update(id_block)
        return dropped, 0, 0
    for i, (h, k) in enumerate(zip(hashes, ids)):
        if seen is not None and h in seen:
            dropped.append(i)
            n_dup += 1
        elif k in seen_ids:
            if refuse is not None:
                refuse(i)
            dropped.append(i)
            n_dup_id += 1
        else:
            if seen is not None:
                seen.add(h)
            seen_ids.add(k)
    return dropped, n_dup, n_dup_id


def _kept_ranges(sizes: list[int], dropped: list[int]) -> list[tuple[int, int]]:
    """(offset, length) of the kept lines of a block, in order."""
    offsets = [0, *accumulate(sizes)]
    ranges, pos = [], 0
    for i in dropped:
        if offsets[i] > pos:
            ranges.append((pos, offsets[i] - pos))
        pos = offsets[i + 1]
    if offsets[-1] > pos:
        ranges.append((pos, offsets[-1] - pos))
    return ranges


def _write_kept(blob, f, ranges: list[tuple[int, int]]) -> None:
    if isinstance(blob, str):  # spooled by a worker: copied in-kernel, then removed
        _copy_ranges(blob, f, ranges)
        os.unlink(blob)
    else:
        view = memoryview(blob)
        for off, n in ranges:
            f.write(view[off:off + n])


def build(tasks: Iterator[tuple], out_file: Path, opts: NoteOptions, workers: int, where: str,
          dedup: bool = True, meanwhile=None, refuse_duplicate_ids: bool = False) -> dict:
    """Run ``tasks`` through the cleaner (in ``workers`` processes) and write the JSONL in order.
    ``meanwhile``: a callable run in a thread of the main process once the workers are forked (the
    main process mostly waits on them). A note whose id was already written is dropped and counted
    (``dropped_duplicate_id``), or refused (UserError) with ``refuse_duplicate_ids``."""
    stats: Counter = Counter()
    seen: set[int] = set()
    seen_ids: set[int] = set()
    lengths: Counter = Counter()

    base = [2]  # line number where the next CSV block starts (line 1 is the header)

    def handle(res, f, task=None):
        if res[0] == "error":
            raise UserError(res[1], path=where, line=base[0] + res[2] - 1)
        _, hashes, sizes, buckets, blob, st, newlines, ids = res
        block_base = base[0]
        base[0] += newlines
        stats.update(st)
        refuse = ((lambda i: _refuse_duplicate_id(blob, sizes, i, ids, task, where, block_base))
                  if refuse_duplicate_ids else None)
        dropped, n_dup, n_dup_id = _repeats(hashes, ids, seen if dedup else None, seen_ids, refuse)
        lengths.update(buckets)
        for i in dropped:
            lengths[buckets[i]] -= 1
        stats["kept"] += len(hashes) - len(dropped)
        if n_dup:
            stats["dropped_duplicate"] += n_dup
        if n_dup_id:
            stats["dropped_duplicate_id"] += n_dup_id
        _write_kept(blob, f, _kept_ranges(sizes, dropped))

    with open(out_file, "wb", buffering=0) as f:
        if workers <= 1:
            _init_worker(opts)
            try:
                for t in tasks:
                    handle(_work(t), f, t)
            finally:
                close_files()
        else:
            try:  # import once here: forked workers inherit it instead of importing it each
                import pyarrow.csv  # noqa: F401
            except ImportError:  # pragma: no cover
                pass
            ctx = mp.get_context("fork")
            spool = spool_dir(out_file.parent)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(opts, spool))
            if meanwhile is not None:  # after the fork: no thread is mid-import when workers start
                threading.Thread(target=meanwhile, daemon=True).start()
            pending: deque = deque()
            try:
                for t in tasks:
                    pending.append((t, pool.apply_async(_work, (t,))))
                    while len(pending) >= 2 * workers:
                        t0, r = pending.popleft()
                        handle(r.get(), f, t0)
                while pending:
                    t0, r = pending.popleft()
                    handle(r.get(), f, t0)
                pool.close()
            except Exception:
                _wind_down(pool, pending)
                raise
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
                shutil.rmtree(spool, ignore_errors=True)
    stats = {k: int(v) for k, v in sorted(stats.items())}
    stats["length_log2_histogram"] = {str(1 << k): int(v) for k, v in sorted(lengths.items()) if v}
    return stats


def _wind_down(pool, pending: deque) -> None:
    """After a refused block: let the tasks already handed out finish, then close the pool.
    ``Pool.terminate()`` here could hang the main process on the task queue's lock when it killed a
    worker holding it (seen as an intermittent hang of the refuse tests under pytest-xdist)."""
    for _, r in pending:
        r.wait(timeout=120)
    if all(r.ready() for _, r in pending):
        pool.close()
    else:  # pragma: no cover - a worker stuck for two minutes
        pool.terminate()


def _refuse_duplicate_id(blob, sizes: list, i: int, ids: list, task, where: str, block_base: int):
    """Raise the UserError for kept note ``i`` of a block, whose id was already written: its id is
    read back from its JSON line; its line in the CSV found by re-reading the block."""
    off = sum(sizes[:i])
    if isinstance(blob, str):
        with open(blob, "rb") as fh:
            fh.seek(off)
            raw = fh.read(sizes[i])
    else:
        raw = bytes(blob[off:off + sizes[i]])
    nid = json.loads(raw)["id"]
    rid = nid.split("-iv-", 1)[1] if nid.startswith("mimic-iv-") else nid.split("-", 1)[1]
    line = None
    if task is not None and task[0] in ("range", "csv"):
        data = read_range(*task[1:4]) if task[0] == "range" else task[1]
        cols = task[-1]
        rows = python_rows(data, cols, with_lines=True)
        if rows and rows[0] != "error":
            nth = sum(1 for k in ids[:i] if k == ids[i])   # copies kept earlier in this block
            hits = [ln for ln, r in rows if str(r[0]).strip() == rid]
            if hits:
                line = block_base + hits[min(nth, len(hits) - 1)] - 1
    raise UserError(f"duplicate note id {rid!r}: a note with this id was kept before it (without "
                    "--refuse-duplicate-ids the first is kept and the others are counted)",
                    path=where, line=line, field="id" if line is None else None)


def _copy_ranges(name: str, f, ranges) -> None:
    """Append the byte ``ranges`` [(offset, length), ...] of file ``name`` to the open unbuffered
    file ``f`` with sendfile (in-kernel, across file systems too: the spool may be on tmpfs);
    pread/write where it is refused."""
    with open(name, "rb") as src:
        for off, n in ranges:
            try:
                while n > 0:
                    done = os.sendfile(f.fileno(), src.fileno(), off, n)
                    if done <= 0:
                        break
                    off, n = off + done, n - done
            except OSError:
                pass
            while n > 0:   # no sendfile here (or it stopped short): copy what is left
                b = os.pread(src.fileno(), min(n, 1 << 22), off)
                if not b:
                    raise OSError(f"{name} is shorter than expected")
                f.write(b)
                off, n = off + len(b), n - len(b)


SPOOL_PREFIX = "medilora-mimic-spool-"


def spool_dir(out_dir: Path) -> str:
    """A private (0700) folder for the workers' output blocks: in RAM (/dev/shm) when it has room
    (writing there costs a third of a disk write, and the main process sends the blocks on with
    sendfile), else beside the output. Spools left by a killed run (their process is gone) are
    removed first: credentialed text must not linger."""
    shm = Path("/dev/shm")
    base = out_dir
    try:
        st = os.statvfs(shm)
        if shm.is_dir() and os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 1 << 30:
            base = shm
    except OSError:
        pass
    for stale in base.glob(SPOOL_PREFIX + "*"):
        try:
            pid = int(stale.name[len(SPOOL_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, OSError):       # not ours to judge (another user's process)
            pass
    return tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=base)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)
