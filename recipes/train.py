"""`tools train STAGE_DIR`: run Axolotl (preprocess, then train through the preset's launcher; one process
lets `axolotl train` prepare the data itself, which saves one Axolotl start-up).

Axolotl trains into ``STAGE_DIR/checkpoints`` (``--output-dir`` on its command line; everything
else is the stage's ``axolotl.yaml``), a folder of mode 0700 that holds the ``checkpoint-N``
folders (``save_steps``/``save_total_limit``: recipes/recipe.py) and, at the end, the final adapter
or model. On success the final files move into a hidden staging folder that gets
``log_history.json`` (the trainer's log history, from the last checkpoint's
``trainer_state.json``, without the wall-clock figures), ``loss.png`` and the manifest (stage
``train``, extra ``base_model``, ``adapter``, ``log_history``, ``final_loss``, ``arch``,
``world_size``, ``resumed_from_step``), and is swapped in as ``STAGE_DIR/output``; then the
checkpoints are deleted. A failed run exits 1 with Axolotl's last error line and leaves no
manifest there; Axolotl's whole output is in ``STAGE_DIR/train.log`` either way.

Resume: a run that failed or was killed (SIGKILL of its process group included) keeps its
checkpoints. The next `tools train` on the same stage (same axolotl.yaml and world size, recorded
in ``checkpoints/medilora-run.json``) resumes from the newest *whole* checkpoint
(:func:`checkpoint_problem`; newer ones cut off mid-write are skipped and removed) and says
"resuming from step N"; it skips ``axolotl preprocess`` when ``prepared/`` was prepared for this
very stage. ``--restart`` discards the checkpoints. The HF Trainer restores weights, optimizer,
scheduler, the RNG state of every process and the data position, so the log history runs on
without a gap and the final adapter is byte for byte the uninterrupted run's (measured on CPU, 1
and 2 processes: tests/recipes/test_train_distributed.py). Only one `tools train` runs a stage at a time
(``STAGE_DIR/.train.lock``). Every Axolotl process dies with its launcher (the start-up shim:
recipes/seeding/sitecustomize.py), so a killed `tools train` leaves no orphan writing checkpoints.

CPU note (measured on the 2-core machine, tiny test Llama, 6 steps of 2 x 256 tokens, shared
load): LoRA fp32 + adamw_torch 5.9 s / 522 tok/s vs QLoRA (4-bit + adamw_bnb_8bit) 6.7 s /
458 tok/s of trainer time, identical losses. A `tools train` of a few steps is dominated by Axolotl's
start-up (~12 s of imports a process): one process lets `axolotl train` prepare the data itself
instead of a separate `axolotl preprocess` process, and the start-up shim keeps datasets' one-process
``save_to_disk`` in the process: 2 steps of the tiny Llama on 12 rows went from 31.5 s (preprocess
17.5 s + train 14.1 s) to 15.7 s wall, idle 2-core machine. Sample packing adds ~20-30 s on CPU
(Numba compiles the multipack sampler twice), so short CPU runs are faster with ``--no-packing``.

Several processes on one machine run through the preset's launcher (``accelerate launch``; on
CPU DDP over gloo). Several nodes cannot be driven from one process: ``tools train`` refuses them
(``--dry-run`` shows the commands; submit ``slurm.sbatch`` or run ``launch.sh`` on every node), and
``--adopt`` records an ``output/`` that such a run wrote as the artifact (checkpoint folders are
left out). ``launch.sh`` resumes such a run itself: before training it asks
``python -m recipes.train --last-checkpoint OUTPUT_DIR WORLD_SIZE`` for the newest whole checkpoint
(measured: 2 torchrun "nodes" on loopback, both killed after checkpoint-2 and started again, end
with log-history steps 1..8 and the uninterrupted adapter, byte for byte).
"""
from __future__ import annotations

import ast
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tools.artifact import Artifact, Stage, read_artifact
from tools.errors import UserError, WorkError
from tools.io import sha256_file, write_json
from tools.progress import log, progress
from tools.stages import STAGE
from tools.yamlio import read_yaml

from . import hardware as P
from . import recipe as R
from .axolotl_cpu import AXOLOTL_ENV
from .logs import plot_loss as _plot
from .selection import KEEP_ALL, check_before_training, run_selection

# wall-clock and memory figures: they differ run to run, so they stay out of log_history.json
VOLATILE = re.compile(r"(runtime|per_second|per_sec|memory/|_flos$|^total_flos$)")
STEP_RE = re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")  # the trainer's bar (no description)
CHECKPOINTS = "checkpoints"  # Axolotl's output_dir under `tools train`: checkpoint-N/ folders, then the final model
RUN_MARKER = "medilora-run.json"  # in checkpoints/: which stage configuration and world size wrote them
PREPARED_MARKER = ".medilora-prepared.json"  # in prepared/: the stage fingerprint its data was prepared for
ERROR_RE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception|Interrupt)|AssertionError|KeyError|OSError)\b.*")


def _stage(stage_dir: str | os.PathLike) -> Artifact:
    return read_artifact(stage_dir, stage=STAGE)


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError("no axolotl.yaml: not a training stage folder", path=str(path.parent))
    cfg = read_yaml(path, what="stage config", default={})
    if not isinstance(cfg, dict):
        raise UserError("expected a mapping", path=str(path))
    return cfg


def plan(stage_dir: str | os.PathLike, work: str | None = None, resume: str | None = None,
         keep_all: bool = False) -> dict:
    """What `tools train` runs for this stage: commands, environment additions, output folder.

    ``work`` is Axolotl's output_dir (default ``STAGE_DIR/checkpoints``), ``resume`` a checkpoint
    folder to resume from; ``keep_all`` keeps every checkpoint (--select-by chooses among them)."""
    stage_dir = Path(stage_dir).resolve()
    art = _stage(stage_dir)
    cfg_file = stage_dir / "axolotl.yaml"
    cfg = _load_yaml(cfg_file)
    preset = P.Preset(**art.extra.get("preset", art.params.get("preset") or {}))
    bindir = Path(sys.executable).parent
    axolotl = str(bindir / "axolotl") if (bindir / "axolotl").exists() else "axolotl"
    overrides = {"output_dir": work or str(stage_dir / CHECKPOINTS)}
    if resume:
        overrides["resume_from_checkpoint"] = resume
    if keep_all:
        overrides.update(KEEP_ALL)
    pre, train = P.axolotl_commands(preset, str(cfg_file), axolotl, overrides)
    # One process: `axolotl train` prepares (tokenizes, filters, saves to dataset_prepared_path) the data itself,
    # the same code as `axolotl preprocess`, and one Axolotl start-up (~12 s of imports) is saved. Several
    # processes prepare it first, once, so the ranks only load it.
    commands = [train] if preset.world_size == 1 else [pre, train]
    full = R.env_for_axolotl(seed=cfg.get("seed"), preset=preset)
    env = {k: full[k] for k in full if k in AXOLOTL_ENV or k.startswith(("MEDILORA_", "ACCELERATE_"))
           or k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    return {"stage_dir": str(stage_dir), "stage": art.stage, "preset": preset.to_dict(), "config": str(cfg_file),
            "world_size": preset.world_size, "base_model": cfg.get("base_model"), "adapter": bool(cfg.get("adapter")),
            "output": str(stage_dir / "output"), "checkpoints": overrides["output_dir"],
            "log": str(stage_dir / "train.log"), "env": dict(sorted(env.items())), "path_prepend": str(bindir),
            "commands": commands, "max_steps": cfg.get("max_steps"),
            "resume_from_step": _step_of(Path(resume)) if resume else resume_step(stage_dir, art, preset)}


# -- checkpoints -----------------------------------------------------------------------------------

def _step_of(p: Path) -> int | None:
    tail = p.name.rsplit("-", 1)[-1]
    return int(tail) if p.name.startswith("checkpoint-") and tail.isdigit() else None


def _safetensors_problem(f: Path) -> str | None:
    """A safetensors file is whole when its header parses and its data ends where the file ends."""
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return "shorter than its header"
            n = int.from_bytes(raw, "little")
            header = json.loads(fh.read(n))
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "unreadable header"
    if f.stat().st_size != 8 + n + end:
        return f"{f.stat().st_size} bytes, its header needs {8 + n + end}"
    return None


def _torch_file_problem(f: Path) -> str | None:
    """torch.save writes a zip whose central directory comes last: a file cut off has none."""
    try:
        with zipfile.ZipFile(f) as z:
            size = f.stat().st_size
            if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                return "truncated"
    except (OSError, zipfile.BadZipFile):
        return "not a whole torch file"
    return None


def checkpoint_problem(ckpt: Path, world_size: int = 1) -> str | None:
    """Why the trainer cannot resume from ``ckpt`` (a ``checkpoint-N`` folder), or None if it is whole.

    The HF Trainer writes a checkpoint in this order: weights (adapter or model), optimizer and
    scheduler, one RNG state per process, then ``trainer_state.json`` (by the main process only, with
    no barrier). Whole means: ``trainer_state.json`` readable and at step N, every weight and torch
    file whole (safetensors size matches its header; torch zips have their central directory), the
    optimizer state present, and one RNG state per process of the run."""
    step = _step_of(ckpt)
    state_f = ckpt / "trainer_state.json"
    if not state_f.is_file():
        return "no trainer_state.json"
    try:
        state = json.loads(state_f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable trainer_state.json"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"trainer_state.json is not at step {step}"
    files = [f for f in ckpt.iterdir() if f.is_file()]
    names = {f.name for f in files}
    weights = [f for f in files if f.name.endswith(".safetensors") or f.name in ("pytorch_model.bin",
                                                                                 "adapter_model.bin")]
    if not weights and not any(f.name.endswith(".index.json") for f in files):
        return "no model or adapter weights"
    for f in files:
        why = (_safetensors_problem(f) if f.name.endswith(".safetensors") else
               _torch_file_problem(f) if f.suffix in (".pt", ".pth", ".bin") else None)
        if why:
            return f"{f.name}: {why}"
    if not ({"optimizer.pt", "optimizer.bin"} & names or (ckpt / "latest").is_file()
            or any(p.name.startswith("optimizer") for p in ckpt.iterdir())):
        return "no optimizer state"
    want = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    missing = [w for w in want if w not in names]
    if missing:
        return f"no {', '.join(missing)}"
    return None


def last_checkpoint(work: Path, world_size: int = 1, drop_broken: bool = True) -> tuple[int, Path] | None:
    """The newest whole checkpoint in ``work``; newer ones cut off mid-write are skipped (and removed,
    so neither the trainer's rotation nor a later run can mistake them for the newest)."""
    found = sorted(((_step_of(p), p) for p in work.glob("checkpoint-*") if p.is_dir() and _step_of(p) is not None),
                   reverse=True)
    whole = []
    for step, p in found:
        why = checkpoint_problem(p, world_size)
        if why is None:
            whole.append((step, p))
            if not _finished(p):
                break
            continue
        log(f"skipping {p.name}: cut off mid-write ({why})")
        if drop_broken:
            shutil.rmtree(p, ignore_errors=True)
    # The final checkpoint of a max_steps run is not resumed from when an earlier one exists: the HF
    # Trainer resumed at global_step == max_steps takes one more (lr 0) step and logs it, so the log
    # history would differ from the uninterrupted run. Redoing the last step from the one before is exact.
    return whole[-1] if whole else None


def _finished(ckpt: Path) -> bool:
    """True for the checkpoint a max_steps run writes at its very last step."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    max_steps = state.get("max_steps") or 0
    return bool(max_steps) and int(state.get("global_step") or 0) >= int(max_steps)


def _prepare_checkpoints(stage_dir: Path, art: Artifact, preset: P.Preset, restart: bool) -> Path:
    """``STAGE_DIR/checkpoints`` (mode 0700), emptied when --restart or when it belongs to another
    configuration of this stage (a re-staged axolotl.yaml, another world size)."""
    work = stage_dir / CHECKPOINTS
    want = _run_marker(art, preset)
    if work.exists():
        try:
            had = json.loads((work / RUN_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            had = None
        if restart:
            log(f"--restart: removing {work}")
            shutil.rmtree(work)
        elif had != want:
            log(f"{work} holds a run of another configuration of this stage: starting over")
            shutil.rmtree(work)
    work.mkdir(mode=0o700, exist_ok=True)
    os.chmod(work, 0o700)  # credentialed data (MIMIC) may sit in the weights and the optimizer state
    write_json(work / RUN_MARKER, want)
    return work


def _run_marker(art: Artifact, preset: P.Preset) -> dict:
    """What ``checkpoints/`` must have been written for to be resumed from (else it is emptied)."""
    return {"stage_fingerprint": art.manifest.get("fingerprint"), "world_size": preset.world_size}


def resume_step(stage_dir: Path, art: Artifact, preset: P.Preset) -> int | None:
    """The step `tools train` resumes from now (None: step 0), by the rules above, changing nothing:
    `tools train --dry-run --json` says it, and `tools status` / `tools run --dry-run` ask it."""
    work = Path(stage_dir) / CHECKPOINTS
    try:
        if json.loads((work / RUN_MARKER).read_text(encoding="utf-8")) != _run_marker(art, preset):
            return None
    except (OSError, ValueError):
        return None
    found = last_checkpoint(work, preset.world_size, drop_broken=False)
    return found[0] if found else None


def _prepared_marker(stage_dir: Path, cfg: dict) -> Path:
    return Path(cfg.get("dataset_prepared_path") or stage_dir / "prepared") / PREPARED_MARKER


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, logf, tail: deque, advance_to, cwd: Path) -> int:
    """Run one Axolotl command, streaming its output to the log file and progress to stderr."""
    logf.write(f"$ {shlex.join(cmd)}\n")
    logf.flush()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                         bufsize=0)
    buf = b""
    assert p.stdout is not None
    while True:
        chunk = p.stdout.read(4096)
        if not chunk:
            break
        logf.write(chunk.decode("utf-8", "replace"))
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for raw in parts:
            _line(raw.decode("utf-8", "replace"), tail, advance_to)
    if buf:
        _line(buf.decode("utf-8", "replace"), tail, advance_to)
    logf.flush()
    return p.wait()


def _line(line: str, tail: deque, advance_to) -> None:
    s = line.strip()
    if not s:
        return
    tail.append(s)
    m = STEP_RE.match(line)
    if m:
        advance_to(int(m.group(1)), int(m.group(2)))
    i = s.find("{'loss'")
    if i >= 0:
        try:
            d = ast.literal_eval(s[i:s.rindex("}") + 1])
            log("  " + ", ".join(f"{k} {d[k]}" for k in ("loss", "grad_norm", "learning_rate", "epoch") if k in d))
        except (ValueError, SyntaxError):
            pass
    elif "[ERROR]" in s or "Success! Preprocessed" in s or "Training completed" in s:
        log("  axolotl: " + s[s.find("]", s.find("[axolotl") if "[axolotl" in s else 0) + 1:].strip()[:200])


def error_line(tail: deque) -> str:
    lines = list(tail)
    for s in reversed(lines):
        if ERROR_RE.match(s):
            return s[:400]
    for s in reversed(lines):
        if "[ERROR]" in s or "Error" in s:
            return s[:400]
    return lines[-1][:400] if lines else "no output"


def read_log_history(work: Path, streamed: list[dict]) -> tuple[list[dict], str]:
    """The trainer's log history from the last checkpoint's trainer_state.json (else what was streamed)."""
    states = sorted(work.glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1)
    if (work / "trainer_state.json").is_file():
        states.append(work / "trainer_state.json")
    if states:
        hist = json.loads(states[-1].read_text(encoding="utf-8")).get("log_history", [])
        return hist, str(states[-1].relative_to(work))
    return streamed, "stdout"


def clean_history(hist: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not VOLATILE.search(k)} for h in hist]


def final_loss(hist: list[dict]) -> float | None:
    for h in reversed(hist):
        if "loss" in h and isinstance(h["loss"], (int, float)):
            return float(h["loss"])
    for h in reversed(hist):
        if "train_loss" in h:
            return float(h["train_loss"])
    return None


def plot_loss(hist: list[dict], out_png: Path, title: str, selection: dict | None = None) -> bool:
    """The loss curve `tools plot` draws (with --select-by's accuracy per checkpoint); False when the
    history holds no train loss."""
    if not any("loss" in h and "step" in h for h in hist):
        return False
    _plot(hist, out_png, title, selection)
    return True


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _collect(src: Path, dest: Path) -> None:
    """Move what Axolotl wrote at the top of ``src`` (final adapter or model, tokenizer, configs) into
    the staging folder; checkpoint folders and our run marker stay behind."""
    for f in sorted(src.iterdir()):
        if (f.is_dir() and _step_of(f) is not None) or f.name == RUN_MARKER:
            continue
        shutil.move(str(f), str(dest / f.name))


def _record(st: Stage, work: Path, cfg: dict, art: Artifact, streamed: list[dict], extra: dict,
            summary: dict | None = None, history_dir: Path | None = None) -> None:
    hist_raw, source = read_log_history(history_dir or work, streamed)
    hist = clean_history(hist_raw)
    write_json(work / "log_history.json", hist)
    plot_loss(hist, work / "loss.png", f"{art.stage}: {Path(str(cfg.get('base_model'))).name}", extra.get("selection"))
    adapter = (work / "adapter_config.json").is_file()
    if not adapter and not (work / "config.json").is_file():
        raise WorkError("Axolotl finished but wrote neither an adapter nor a model")
    # the trainer's closing summary (printed after the last checkpoint, so not in trainer_state.json)
    timing = {k: _num(v) for h in [*hist_raw, summary or {}] for k, v in h.items()
              if k in ("train_runtime", "train_samples_per_second", "train_steps_per_second")}
    tokens = max([h.get("tokens/total", 0) for h in hist] or [0])
    if tokens and timing.get("train_runtime"):
        timing["tokens"] = tokens
        timing["tokens_per_second"] = round(tokens / timing["train_runtime"], 1)
    st.extra.update({
        "base_model": cfg.get("base_model"), "adapter": adapter, "arch": "causal", "log_history": hist,
        "log_history_from": source, "final_loss": final_loss(hist),
        "steps": max([h.get("step", 0) for h in hist] or [0]), "stage_dir": str(Path(art.path).resolve()),
        "axolotl_config": str((Path(art.path) / "axolotl.yaml").resolve()), "timing": timing,
        "quantized_base": "4bit" if cfg.get("load_in_4bit") else "8bit" if cfg.get("load_in_8bit") else None,
        "lora_model_dir": cfg.get("lora_model_dir"), **extra,
    })


def train_stage(stage_dir: str | os.PathLike, dry_run: bool = False, force: bool = False,
                adopt: bool = False, restart: bool = False, select: Callable | None = None) -> Artifact | dict:
    """Train a stage folder; return the ``train`` artifact (``STAGE_DIR/output``) or, with
    ``dry_run``, the plan (a dict: commands, environment, output). Raises UserError / WorkError.

    Axolotl trains into ``STAGE_DIR/checkpoints`` (mode 0700); a run that failed or was killed leaves
    its checkpoints there and the next call resumes from the last whole one ("resuming from step N"
    on stderr); ``restart`` discards them and starts from step 0. ``select`` (``evals.select.selector``,
    `--select-by`) keeps every checkpoint and puts the one it chooses into the output
    (recipes/selection.py)."""
    stage_dir = Path(stage_dir).resolve()
    art = _stage(stage_dir)
    if art.extra.get("arch") == "seq2seq" or art.params.get("arch") == "seq2seq":
        from . import seq2seq  # written by the seq2seq recipes; imported only when needed
        return seq2seq.train(stage_dir, dry_run=dry_run)
    cfg_file = stage_dir / "axolotl.yaml"
    cfg = _load_yaml(cfg_file)
    if "axolotl.yaml" in art.outputs():
        want = next(o["sha256"] for o in art.manifest["outputs"] if o["path"] == "axolotl.yaml")
        if sha256_file(cfg_file) != want:
            raise UserError("axolotl.yaml was edited after `tools stage` wrote it: re-stage with --set (or --force)",
                            path=str(cfg_file))
    the_plan = plan(stage_dir, keep_all=select is not None)
    preset = P.Preset(**the_plan["preset"])
    if dry_run:
        return {**the_plan, "resume_from_step": None} if restart else the_plan
    if cfg.get("rl") == "grpo" and preset.device == "cpu":
        raise UserError("GRPO samples its completions with a vLLM server (trl.use_vllm, `axolotl vllm-serve`), which "
                        "needs a GPU: train this stage on a GPU machine", path=str(cfg_file), field="rl")
    if adopt and select is not None:
        raise UserError("--select-by chooses among the checkpoints of a `tools train` run; --adopt has none",
                        field="--select-by")
    if preset.nodes > 1 and not adopt:
        raise UserError(f"this stage spans {preset.nodes} nodes: submit `sbatch {stage_dir}/slurm.sbatch` (or run "
                        f"launch.sh on every node), then record the result with `tools train {stage_dir} --adopt`",
                        path=str(stage_dir))
    for d in cfg.get("datasets") or []:
        if isinstance(d, dict) and d.get("path") and str(d["path"]).startswith("/") and not Path(d["path"]).is_file():
            raise UserError("training data is gone", path=str(d["path"]), field="datasets")
    check_before_training(select, cfg)
    out = stage_dir / "output"
    params = {"stage_fingerprint": art.manifest.get("fingerprint"), "launcher": preset.launcher,
              "adopted": bool(adopt)}
    if select is not None:  # a new parameter: trainings without it keep their fingerprints
        params["select_by"] = getattr(select, "spec", str(select))
    ckpts = stage_dir / CHECKPOINTS
    lock = _lock(stage_dir)  # noqa: F841 - held until this function returns
    with Stage("train", out, params, inputs=[stage_dir], force=force or restart, log=log) as st:
        if st.skipped:
            _drop_leftover(ckpts, art, preset)
            return st.result
        work = st.work
        assert work is not None
        if adopt:
            if not out.is_dir() or not any(out.iterdir()):
                raise UserError("nothing to adopt: output/ is empty or missing", path=str(out))
            _collect(out, work)
            _record(st, work, cfg, art, [], {"adopted": True, "world_size": preset.world_size,
                                              "resumed_from_step": None}, history_dir=out)
        else:
            _train(st, work, stage_dir, cfg, art, preset, restart, select)
    if not adopt:
        shutil.rmtree(ckpts, ignore_errors=True)  # output/ is recorded: the checkpoints have served
    return _finish(st.result)


def _lock(stage_dir: Path):
    """One `tools train` a stage at a time (they would share checkpoints/); then clear the staging
    folders of killed runs (the artifact contract never reads them)."""
    f = open(stage_dir / ".train.lock", "a+")  # noqa: SIM115 - the lock lives as long as the file object
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError("another `tools train` is running on this stage", path=str(stage_dir)) from None
    for d in list(stage_dir.glob(".output.partial-*")) + list(stage_dir.glob(".output.old-*")):
        shutil.rmtree(d, ignore_errors=True)
    return f


def _drop_leftover(ckpts: Path, art: Artifact, preset: P.Preset) -> None:
    """Checkpoints left by a run killed after output/ was recorded (same configuration): not needed."""
    try:
        had = json.loads((ckpts / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if had == _run_marker(art, preset):
        shutil.rmtree(ckpts, ignore_errors=True)


@dataclass
class _Job:
    """One Axolotl run of a stage: what `_train` decided and `_run_axolotl` runs."""

    st: Stage
    work: Path
    stage_dir: Path
    cfg: dict
    art: Artifact
    preset: P.Preset
    ckpts: Path
    last: tuple[int, Path] | None
    env: dict
    pre: list[str] | None  # None: one process, Axolotl's train prepares the data itself
    train: list[str]
    prepared: bool
    prepared_for: dict
    marker: Path
    select: Callable | None = None  # --select-by: evals.select.selector(SPEC)


def _train(st: Stage, work: Path, stage_dir: Path, cfg: dict, art: Artifact, preset: P.Preset,
           restart: bool, select: Callable | None = None) -> None:
    ckpts = _prepare_checkpoints(stage_dir, art, preset, restart)
    last = last_checkpoint(ckpts, preset.world_size)
    env = R.env_for_axolotl(seed=cfg.get("seed", 42), preset=preset)
    env["MEDILORA_DIE_WITH_PARENT"] = "1"  # killed with `tools train` (recipes/seeding/sitecustomize.py)
    the_plan = plan(stage_dir, str(ckpts), str(last[1]) if last else None, keep_all=select is not None)
    *before, train = the_plan["commands"]
    prepared_for = {"stage_fingerprint": art.manifest.get("fingerprint"),
                    "axolotl_yaml": sha256_file(stage_dir / "axolotl.yaml")}
    marker = _prepared_marker(stage_dir, cfg)
    try:
        prepared = json.loads(marker.read_text(encoding="utf-8")) == prepared_for
    except (OSError, ValueError):
        prepared = False
    job = _Job(st, work, stage_dir, cfg, art, preset, ckpts, last, env, before[0] if before else None, train,
               prepared, prepared_for, marker, select)
    try:
        _run_axolotl(job)
    except BaseException:
        if not any(_step_of(p) is not None for p in ckpts.iterdir()):
            shutil.rmtree(ckpts, ignore_errors=True)  # nothing to resume from
        raise


def _preprocess(job: _Job, logf, tail: deque, log_path: Path) -> None:
    """Run (or skip) `axolotl preprocess` of several processes; one process prepares in `axolotl train`."""
    if job.prepared:
        log(f"preprocess: skipped (the data in {job.marker.parent} was prepared for this stage)")
        return
    job.marker.unlink(missing_ok=True)
    if job.pre is None:
        log("preprocess: by `axolotl train` itself (one process)")
        return
    log(f"preprocess: {shlex.join(job.pre)}")
    rc = _run(job.pre, job.env, logf, tail, lambda *_: None, job.stage_dir)
    if rc != 0:
        raise WorkError(f"axolotl preprocess failed (exit {rc}): {error_line(tail)} (log: {log_path})")
    write_json(job.marker, job.prepared_for)


def _train_steps(job: _Job, logf, tail: deque, log_path: Path) -> None:
    """Run `axolotl train`, advancing a progress bar from the trainer's own bar; WorkError if it fails."""
    resumed = job.last[0] if job.last else None
    logf.flush()
    started_at = logf.tell()
    log(f"train ({job.preset.launcher}, world size {job.preset.world_size}): {shlex.join(job.train)}")
    total = int(job.cfg.get("max_steps") or 0) or None
    with progress("training", total=total, unit="steps") as advance:
        seen = {"n": resumed or 0, "total": total}
        if resumed:
            advance(resumed)

        def advance_to(n, bar_total):
            if seen["total"] is None:
                seen["total"] = bar_total
            if bar_total == seen["total"] and n > seen["n"]:  # not the eval bars
                advance(n - seen["n"])
                seen["n"] = n
        rc = _run(job.train, job.env, logf, tail, advance_to, job.stage_dir)
    if rc != 0:
        kept = last_checkpoint(job.ckpts, job.preset.world_size, drop_broken=False)
        where = (f"checkpoint-{kept[0]} kept in {job.ckpts}: `tools train` again resumes from it, --restart starts "
                 "over" if kept else "no checkpoint was written")
        phase = "" if _trainer_started(log_path, started_at) else " before training started"
        raise WorkError(f"axolotl train failed{phase} (exit {rc}): {error_line(tail)} (log: {log_path}; {where})")


def _streamed(tail: deque) -> tuple[list[dict], dict]:
    """(the loss dicts the trainer printed, its closing summary) from the last lines of its output."""
    streamed: list[dict] = []
    summary: dict = {}
    for s in tail:
        for key, sink in (("{'loss'", streamed), ("{'train_runtime'", None)):
            i = s.find(key)
            if i < 0:
                continue
            try:
                d = ast.literal_eval(s[i:s.rindex("}") + 1])
            except (ValueError, SyntaxError):
                continue
            if sink is not None:
                sink.append(d)
            else:
                summary = d
    return streamed, summary


def _run_axolotl(job: _Job) -> None:
    resumed = job.last[0] if job.last else None
    tail: deque = deque(maxlen=400)
    t0 = time.time()
    log_path = job.stage_dir / "train.log"
    with open(log_path, "a" if resumed else "w", encoding="utf-8") as logf:
        if resumed:
            logf.write(f"# resuming from step {resumed} ({job.last[1]})\n")
            log(f"resuming from step {resumed} ({job.last[1].name} in {job.ckpts})")
        _preprocess(job, logf, tail, log_path)
        t1 = time.time()
        _train_steps(job, logf, tail, log_path)
        if not job.prepared and job.pre is None:
            write_json(job.marker, job.prepared_for)  # Axolotl's train saved the data it prepared
        t2 = time.time()
    streamed, summary = _streamed(tail)
    _collect(job.ckpts, job.work)
    extra = {"wall_seconds": {"preprocess": round(t1 - t0, 1) if job.pre is not None else None,
                              "train": round(t2 - t1, 1)},
             "world_size": job.preset.world_size, "resumed_from_step": resumed}
    if job.select is not None:
        whole = [(_step_of(p), p) for p in job.ckpts.glob("checkpoint-*")
                 if _step_of(p) is not None and checkpoint_problem(p, job.preset.world_size) is None]
        extra["selection"] = run_selection(job.select, whole, job.cfg, job.work)
    _record(job.st, job.work, job.cfg, job.art, streamed, extra, summary, history_dir=job.ckpts)


def _trainer_started(log_path: Path, offset: int) -> bool:
    """Whether the `axolotl train` logged from ``offset`` of train.log got as far as its trainer."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return any("Starting trainer" in line for line in f)


def _finish(res: Artifact) -> Artifact:
    e = res.extra
    resumed = f", resumed from step {e['resumed_from_step']}" if e.get("resumed_from_step") else ""
    log(f"train: {res.path} ({'adapter' if e.get('adapter') else 'full model'}, {e.get('steps')} steps, "
        f"world size {e.get('world_size', 1)}{resumed}, final loss {e.get('final_loss')})")
    return res


def _main(argv: list[str]) -> int:
    """``python -m recipes.train --last-checkpoint DIR WORLD_SIZE``: print the newest whole checkpoint
    in DIR (nothing if none); launch.sh resumes from it. Broken ones are reported, not removed (other
    nodes read the same folder)."""
    if len(argv) != 3 or argv[0] != "--last-checkpoint":
        sys.stderr.write("usage: python -m recipes.train --last-checkpoint DIR WORLD_SIZE\n")
        return 2
    d = Path(argv[1])
    found = last_checkpoint(d, int(argv[2]), drop_broken=False) if d.is_dir() else None
    if found:
        log(f"resuming from step {found[0]} ({found[1]})")
        print(found[1])
    return 0


def dry_run_lines(plan: dict) -> list[str]:
    """`tools train --dry-run`: the header and each command, with the environment it runs in."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.get("env", {}).items())
    resume = plan.get("resume_from_step")
    return [f"# {plan.get('stage')} {plan.get('stage_dir')} -> {plan.get('output')} (log {plan.get('log')})"] + \
        ([f"# resumes from its checkpoint at step {resume}"] if resume else []) + [
        f"PATH={shlex.quote(plan['path_prepend'])}:$PATH {env} {shlex.join(cmd)}" for cmd in plan["commands"]]


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

