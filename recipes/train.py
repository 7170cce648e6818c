"""`tools train STAGE_DIR`: run Axolotl (preprocess, then train through the preset's launcher).

Axolotl trains into a hidden staging folder beside ``STAGE_DIR/output`` (``--output-dir`` on its
command line; everything else is the stage's ``axolotl.yaml``). On success the staging folder
gets ``log_history.json`` (the trainer's log history, from the last checkpoint's
``trainer_state.json``, without the wall-clock figures), ``loss.png`` and the manifest (stage
``train``, extra ``base_model``, ``adapter``, ``log_history``, ``final_loss``, ``arch``), and is
swapped in as ``STAGE_DIR/output``. A failed run exits 1 with Axolotl's last error line and leaves
no manifest there; Axolotl's whole output is in ``STAGE_DIR/train.log`` either way.

CPU note (measured on the 2-core machine, tiny test Llama, 6 steps of 2 x 256 tokens, shared
load): LoRA fp32 + adamw_torch 5.9 s / 522 tok/s vs QLoRA (4-bit + adamw_bnb_8bit) 6.7 s /
458 tok/s of trainer time, identical losses; each `tools train` is ~100 s wall, dominated by
Axolotl's start-up (preprocess ~55 s, train ~45 s). Sample packing adds ~20-30 s on CPU (Numba
compiles the multipack sampler twice), so short CPU runs are faster with ``--no-packing``.

Several nodes cannot be driven from one process: ``tools train`` refuses them (``--dry-run``
shows the commands; submit ``slurm.sbatch``), and ``--adopt`` records an ``output/`` that such a
run wrote as the artifact.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from tools.artifact import Artifact, Stage, read_artifact
from tools.errors import UserError, WorkError
from tools.io import write_json
from tools.progress import log, progress

from . import presets as P
from . import recipe as R

# wall-clock and memory figures: they differ run to run, so they stay out of log_history.json
VOLATILE = re.compile(r"(runtime|per_second|per_sec|memory/|_flos$|^total_flos$)")
STEP_RE = re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")  # the trainer's bar (no description)
ERROR_RE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception|Interrupt)|AssertionError|KeyError|OSError)\b.*")


def _stage(stage_dir: str | os.PathLike) -> Artifact:
    return read_artifact(stage_dir, stage=("stage.",))


def _load_yaml(path: Path) -> dict:
    from tools.yamlio import read_yaml

    if not path.is_file():
        raise UserError("no axolotl.yaml: not a training stage folder", path=str(path.parent))
    cfg = read_yaml(path, what="stage config", default={})
    if not isinstance(cfg, dict):
        raise UserError("expected a mapping", path=str(path))
    return cfg


def plan(stage_dir: str | os.PathLike, work: str | None = None) -> dict:
    """What `tools train` runs for this stage: commands, environment additions, output folder."""
    stage_dir = Path(stage_dir).resolve()
    art = _stage(stage_dir)
    cfg_file = stage_dir / "axolotl.yaml"
    cfg = _load_yaml(cfg_file)
    preset = P.Preset(**art.extra.get("preset", art.params.get("preset") or {}))
    bindir = Path(sys.executable).parent
    axolotl = str(bindir / "axolotl") if (bindir / "axolotl").exists() else "axolotl"
    overrides = {"output_dir": work or "<STAGE_DIR/.output.partial-*>"}
    pre, train = P.axolotl_commands(preset, str(cfg_file), axolotl, overrides)
    from .profiles import AXOLOTL_ENV
    return {"stage_dir": str(stage_dir), "stage": art.stage, "preset": preset.to_dict(), "config": str(cfg_file),
            "base_model": cfg.get("base_model"), "adapter": bool(cfg.get("adapter")),
            "output": str(stage_dir / "output"), "log": str(stage_dir / "train.log"),
            "env": dict(sorted(AXOLOTL_ENV.items())), "path_prepend": str(bindir),
            "commands": [pre, train], "max_steps": cfg.get("max_steps")}


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


def plot_loss(hist: list[dict], out_png: Path, title: str) -> bool:
    """The loss curve `tools plot` draws; False when the history holds no train loss."""
    if not any("loss" in h and "step" in h for h in hist):
        return False
    from recipes.logs import plot_loss as _plot
    _plot(hist, out_png, title)
    return True


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _record(st: Stage, work: Path, cfg: dict, art: Artifact, streamed: list[dict], extra: dict,
            summary: dict | None = None) -> None:
    hist_raw, source = read_log_history(work, streamed)
    hist = clean_history(hist_raw)
    write_json(work / "log_history.json", hist)
    plot_loss(hist, work / "loss.png", f"{art.stage}: {Path(str(cfg.get('base_model'))).name}")
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
        "steps": max([h.get("step", 0) for h in hist] or [0]), "stage_dir": str(work.parent.resolve()),
        "axolotl_config": str((Path(art.path) / "axolotl.yaml").resolve()), "timing": timing,
        "quantized_base": "4bit" if cfg.get("load_in_4bit") else "8bit" if cfg.get("load_in_8bit") else None,
        "lora_model_dir": cfg.get("lora_model_dir"), **extra,
    })


def train_stage(stage_dir: str | os.PathLike, dry_run: bool = False, force: bool = False,
                adopt: bool = False) -> Artifact | dict:
    """Train a stage folder; return the ``train`` artifact (``STAGE_DIR/output``) or, with
    ``dry_run``, the plan (a dict: commands, environment, output). Raises UserError / WorkError."""
    stage_dir = Path(stage_dir).resolve()
    art = _stage(stage_dir)
    if art.extra.get("arch") == "seq2seq" or art.params.get("arch") == "seq2seq":
        from . import seq2seq  # written by the seq2seq recipes; imported only when needed
        return seq2seq.train(stage_dir, dry_run=dry_run)
    cfg_file = stage_dir / "axolotl.yaml"
    cfg = _load_yaml(cfg_file)
    if "axolotl.yaml" in art.outputs():
        from tools.io import sha256_file
        want = next(o["sha256"] for o in art.manifest["outputs"] if o["path"] == "axolotl.yaml")
        if sha256_file(cfg_file) != want:
            raise UserError("axolotl.yaml was edited after `tools stage` wrote it: re-stage with --set (or --force)",
                            path=str(cfg_file))
    the_plan = plan(stage_dir)
    preset = P.Preset(**the_plan["preset"])
    if dry_run:
        return the_plan
    if preset.nodes > 1 and not adopt:
        raise UserError(f"this stage spans {preset.nodes} nodes: submit `sbatch {stage_dir}/slurm.sbatch` (or run "
                        f"launch.sh on every node), then record the result with `tools train {stage_dir} --adopt`",
                        path=str(stage_dir))
    for d in cfg.get("datasets") or []:
        if isinstance(d, dict) and d.get("path") and str(d["path"]).startswith("/") and not Path(d["path"]).is_file():
            raise UserError("training data is gone", path=str(d["path"]), field="datasets")
    out = stage_dir / "output"
    params = {"stage_fingerprint": art.manifest.get("fingerprint"), "launcher": preset.launcher,
              "adopted": bool(adopt)}
    with Stage("train", out, params, inputs=[stage_dir], force=force, log=log) as st:
        if st.skipped:
            return st.result
        work = st.work
        assert work is not None
        if adopt:
            if not out.is_dir() or not any(out.iterdir()):
                raise UserError("nothing to adopt: output/ is empty or missing", path=str(out))
            for f in sorted(out.iterdir()):
                shutil.move(str(f), str(work / f.name))
            _record(st, work, cfg, art, [], {"adopted": True})
        else:
            _train(st, work, stage_dir, cfg, art, preset)
    return _finish(st.result)


def _train(st: Stage, work: Path, stage_dir: Path, cfg: dict, art: Artifact, preset: P.Preset) -> None:
    env = R.env_for_axolotl(seed=cfg.get("seed", 42))
    pre, train = plan(stage_dir, str(work))["commands"]
    tail: deque = deque(maxlen=400)
    streamed: list[dict] = []
    t0 = time.time()
    log_path = stage_dir / "train.log"
    with open(log_path, "w", encoding="utf-8") as logf:
        log(f"preprocess: {shlex.join(pre)}")
        rc = _run(pre, env, logf, tail, lambda *_: None, stage_dir)
        if rc != 0:
            raise WorkError(f"axolotl preprocess failed (exit {rc}): {error_line(tail)} (log: {log_path})")
        t1 = time.time()
        log(f"train ({preset.launcher}): {shlex.join(train)}")
        total = int(cfg.get("max_steps") or 0) or None
        with progress("training", total=total, unit="steps") as advance:
            seen = {"n": 0, "total": total}

            def advance_to(n, bar_total):
                if seen["total"] is None:
                    seen["total"] = bar_total
                if bar_total == seen["total"] and n > seen["n"]:  # not the eval bars
                    advance(n - seen["n"])
                    seen["n"] = n
            rc = _run(train, env, logf, tail, advance_to, stage_dir)
        if rc != 0:
            raise WorkError(f"axolotl train failed (exit {rc}): {error_line(tail)} (log: {log_path})")
        t2 = time.time()
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
    _record(st, work, cfg, art, streamed, {"wall_seconds": {"preprocess": round(t1 - t0, 1),
                                                            "train": round(t2 - t1, 1)}}, summary)


def _finish(res: Artifact) -> Artifact:
    e = res.extra
    log(f"train: {res.path} ({'adapter' if e.get('adapter') else 'full model'}, {e.get('steps')} steps, "
        f"final loss {e.get('final_loss')})")
    return res
