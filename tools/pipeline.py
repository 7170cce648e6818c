"""`tools run PIPELINE.yaml` and `tools status RUN_DIR`: a whole pipeline, resumable step by step.

A pipeline file lists steps; each is one `tools` verb with its arguments. Placeholders:
``{run_dir}``, ``{repo}``, ``{vars.NAME}``, ``{env.NAME}`` and
``{steps.NAME.out}`` (the output folder of an earlier step). Each step gets ``--out RUN_DIR/NAME``
unless its verb's artifact has a fixed place (tools.stages.FIXED_OUT: ``train STAGE`` writes
``STAGE/output``); a step reads every earlier step whose output lies inside a path it names (so
``merge STAGE`` reads the ``train STAGE`` step). A verb without ``--force`` (``push``) leaves no artifact:
its step is done when run with the same command and inputs.

A step is *done* when its output folder has a manifest and the step's command and the digests of
the steps it reads are what they were when it ran; done steps are skipped without starting a
process. A step killed or failed half-way left no manifest (the artifact contract), so the next
`tools run` re-runs exactly that step and what follows; a `train` step re-run that way resumes
from its last whole checkpoint (kept in ``STAGE/checkpoints``), not from step 0.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from .artifact import is_artifact, read_artifact
from .errors import UserError, WorkError
from .io import write_json
from .paths import REPO
from .stages import FIXED_OUT, RESUMABLE, key_figures
from .yamlio import read_yaml

STATE = "run.json"
_PH = re.compile(r"\{(run_dir|repo|vars\.[A-Za-z0-9_]+|env\.[A-Za-z0-9_]+|steps\.[A-Za-z0-9_-]+\.out)\}")
def load_pipeline(path: str | os.PathLike) -> dict:
    p = Path(path)
    doc = read_yaml(p, what="pipeline file")
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise UserError("a pipeline needs a non-empty `steps:` list", path=str(p), field="steps")
    names = set()
    for i, s in enumerate(doc["steps"]):
        if not isinstance(s, dict) or "name" not in s or "run" not in s:
            raise UserError(f"step {i + 1} needs `name` and `run`", path=str(p), field=f"steps[{i}]")
        if s["name"] in names:
            raise UserError(f"duplicate step name {s['name']!r}", path=str(p), field=f"steps[{i}].name")
        names.add(s["name"])
    doc.setdefault("vars", {})
    doc["_path"] = str(p)
    return doc


class Plan:
    def __init__(self, doc: dict, run_dir: Path):
        self.doc = doc
        self.run_dir = run_dir
        self.outs: dict[str, Path] = {}
        self.reads: dict[str, list[str]] = {}
        self.argv: dict[str, list[str]] = {}
        self.makes_artifact: dict[str, bool] = {}
        for s in doc["steps"]:
            self._resolve(s)

    def _sub(self, text: str, step: str) -> str:
        def rep(m):
            key = m.group(1)
            if key == "run_dir":
                return str(self.run_dir)
            if key == "repo":
                return str(REPO)
            if key.startswith("vars."):
                name = key[5:]
                if name not in self.doc["vars"]:
                    raise UserError(f"step {step!r} uses undefined {{{key}}}", path=self.doc["_path"], field=step)
                return self._sub(str(self.doc["vars"][name]), step)
            if key.startswith("env."):
                name = key[4:]
                if name not in os.environ:
                    raise UserError(f"step {step!r} needs environment variable {name}", path=self.doc["_path"], field=step)
                return os.environ[name]
            dep = key.split(".")[1]
            if dep not in self.outs:
                raise UserError(f"step {step!r} reads {{{key}}} but no earlier step is named {dep!r}",
                                path=self.doc["_path"], field=step)
            self.reads[step].append(dep)
            return str(self.outs[dep])
        return _PH.sub(rep, text)

    def _resolve(self, s: dict) -> None:
        name = s["name"]
        self.reads[name] = []
        argv = shlex.split(self._sub(str(s["run"]), name))
        for gone in ("after", "out_flag", "artifact"):
            if gone in s:
                raise UserError(f"`{gone}:` is no longer needed (reads and outputs follow from the commands): "
                                "remove it", path=self.doc["_path"], field=f"{name}.{gone}")
        fixed = FIXED_OUT.get(argv[0]) if len(argv) > 1 else None
        if "out" in s:
            out = Path(self._sub(str(s["out"]), name))
        else:
            out = fixed(argv[1]).resolve() if fixed else self.run_dir / name
        cmd, _ = find_verb(argv)
        takes_out = cmd is None or any("--out" in p.opts for p in cmd.params)  # an unknown verb: check_commands
        if takes_out and "--out" not in argv:
            argv += ["--out", str(out)]
        named = [Path(a).resolve() for a in argv[1:] if not a.startswith("-") and os.sep in a]
        for dep, dep_out in self.outs.items():  # steps read indirectly: an output inside a folder this step names
            if dep not in self.reads[name] and any(dep_out.resolve().is_relative_to(p) for p in named):
                self.reads[name].append(dep)
        self.outs[name] = out
        self.argv[name] = argv
        # an artifact verb takes --force (re-running it with the same inputs does nothing); push takes neither
        self.makes_artifact[name] = cmd is None or any("--force" in p.opts for p in cmd.params)

    def names(self) -> list[str]:
        return [s["name"] for s in self.doc["steps"]]


def _state(run_dir: Path) -> dict:
    f = run_dir / STATE
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except ValueError:
            return {"steps": {}}
    return {"steps": {}}


def _digest(out: Path) -> str | None:
    if not is_artifact(out):
        return None
    return read_artifact(out).digest


def step_status(plan: Plan, state: dict, name: str) -> str:
    out = plan.outs[name]
    rec = state["steps"].get(name)
    if not plan.makes_artifact[name]:  # e.g. `push --dry-run`: done when run with the same command and inputs
        if not rec:
            return "to do"
        same = rec.get("argv") == plan.argv[name] and all(
            rec.get("reads", {}).get(d) == _digest(plan.outs[d]) for d in plan.reads[name])
        return "done" if same else "stale"
    if not is_artifact(out):
        return "to do"
    if not rec or rec.get("argv") != plan.argv[name]:
        return "stale"
    for dep in plan.reads[name]:
        if rec.get("reads", {}).get(dep) != _digest(plan.outs[dep]):
            return "stale"
    if rec.get("digest") != _digest(out):
        return "stale"
    if rec.get("files", {}) != _file_stats(out):
        return "stale"  # an input file outside the run changed (size or mtime): let the verb decide
    return "done"


def resume_note(argv: list[str]) -> str:
    """What a resumable step (a `train STAGE` killed half-way) would resume from, asked of the verb itself
    (`tools train STAGE --dry-run --json`, the rule recipes/train.py applies), not re-decided here."""
    if len(argv) < 2 or argv[0] not in RESUMABLE or "--restart" in argv or not (Path(argv[1]) / "checkpoints").is_dir():
        return ""
    r = subprocess.run(_tools_argv() + [argv[0], argv[1], "--dry-run", "--json"], capture_output=True, text=True)
    try:
        step = json.loads(r.stdout)["results"]["resume_from_step"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f" (resumes from its checkpoint at step {step})" if step else ""


def _file_stats(out: Path) -> dict:
    """Size and mtime of the plain-file inputs recorded in a step's manifest."""
    stats = {}
    if not is_artifact(out):
        return stats
    for i in read_artifact(out).manifest.get("inputs", []):
        if i.get("kind") == "file":
            p = Path(i["path"])
            try:
                st = p.stat()
                stats[i["path"]] = [st.st_size, st.st_mtime_ns]
            except OSError:
                stats[i["path"]] = None
    return stats


def _tools_argv() -> list[str]:
    exe = Path(sys.executable).parent / "tools"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tools"]


def find_verb(argv: list[str]) -> tuple[click.Command | None, int]:
    """The Click command ``tools ARGV`` runs and how many words name it; (None, i) if word i names no verb."""
    from .cli import cli  # the CLI edge: imported when a pipeline is read, not when tools.pipeline is

    cmd, i = cli, 0
    while isinstance(cmd, click.Group):
        if i >= len(argv) or argv[i] not in cmd.commands:
            return None, i
        cmd, i = cmd.commands[argv[i]], i + 1
    return cmd, i


def check_commands(plan: Plan) -> None:
    """Every step names an existing verb and only options that verb has (before running anything)."""
    for n in plan.names():
        argv = plan.argv[n]
        cmd, i = find_verb(argv)
        if cmd is None:
            got = argv[i] if i < len(argv) else "nothing"
            raise UserError(f"step {n!r}: `tools {' '.join(argv[:i])}` has no verb {got!r}",
                            path=plan.doc["_path"], field=n)
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for tok in argv[i:]:
            if tok.startswith("--") and tok.split("=", 1)[0] not in known:
                raise UserError(f"step {n!r}: `tools {' '.join(argv[:i])}` has no option {tok.split('=', 1)[0]}",
                                path=plan.doc["_path"], field=n)


def apply_vars(doc: dict, variables: dict, strict: bool = True) -> dict:
    """Override the pipeline's variables (``--var NAME=VALUE``); an unknown name is a user error."""
    for k, v in variables.items():
        if k not in doc["vars"]:
            if strict:
                raise UserError(f"pipeline has no variable {k!r} (has: {', '.join(doc['vars']) or 'none'})",
                                field="--var")
            continue
        doc["vars"][k] = v
    return doc


def run_pipeline(pipeline: str, run_dir: str, *, until: str | None = None, start: str | None = None,
                 dry_run: bool = False, echo=click.echo, variables: dict | None = None) -> dict:
    doc = apply_vars(load_pipeline(pipeline), variables or {})
    rd = Path(run_dir or Path("runs") / Path(pipeline).stem).resolve()
    plan = Plan(doc, rd)
    names = plan.names()
    for flag, v in (("--until", until), ("--from", start)):
        if v is not None and v not in names:
            raise UserError(f"no step named {v!r} (steps: {', '.join(names)})", field=flag)
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    state = _state(rd)
    check_commands(plan)
    if dry_run:
        for i, n in enumerate(names):
            mark = "" if first <= i <= last else "  (not selected)"
            st = step_status(plan, state, n)
            note = resume_note(plan.argv[n]) if st != "done" else ""
            echo(f"[{st}] {n}: tools {shlex.join(plan.argv[n])}{note}{mark}")
        return state
    rd.mkdir(parents=True, exist_ok=True)
    state["pipeline"] = str(Path(pipeline).resolve())
    state["vars"] = dict(variables or {})   # `tools status` judges the steps with the same values
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for i, n in enumerate(names):
        if not first <= i <= last:
            continue
        st = step_status(plan, state, n)
        if st == "done":
            echo(f"[done] {n} (skipped: same command and inputs)", err=True)
            continue
        echo(f"[run ] {n}: tools {shlex.join(plan.argv[n])}{resume_note(plan.argv[n])}", err=True)
        t0 = time.time()
        r = subprocess.run(_tools_argv() + plan.argv[n], env=env)
        secs = time.time() - t0
        if r.returncode != 0:
            raise (UserError if r.returncode == 2 else WorkError)(
                f"step {n!r} failed (exit {r.returncode}); fix it and re-run `tools run` to resume from it")
        if plan.makes_artifact[n] and not is_artifact(plan.outs[n]):
            raise WorkError(f"step {n!r} finished but left no artifact at {plan.outs[n]}")
        state["steps"][n] = {"argv": plan.argv[n], "seconds": round(secs, 1), "digest": _digest(plan.outs[n]),
                             "reads": {d: _digest(plan.outs[d]) for d in plan.reads[n]},
                             "files": _file_stats(plan.outs[n]),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(rd / STATE, state)
    return state


def _figures(out: Path) -> str:
    if not is_artifact(out):
        return ""
    art = read_artifact(out)
    ex = art.extra
    flat = {}
    for k, v in ex.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                flat.setdefault(k2, v2)
        flat.setdefault(k, v)
    parts = []
    for k in key_figures(art.stage):
        v = flat.get(k)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def parse_vars(variables) -> dict[str, str]:
    """``--var NAME=VALUE`` pairs as a dict."""
    vs = {}
    for v in variables:
        if "=" not in v:
            raise UserError(f"--var {v!r} is not NAME=VALUE", field="--var")
        k, val = v.split("=", 1)
        vs[k] = val
    return vs


def status_table(run_dir, pipeline=None):
    """`tools status`: the rich Table of a run's steps: done / stale / to do, time, key figures."""
    from rich.table import Table

    rd = Path(run_dir).resolve()
    state = _state(rd)
    pipeline = pipeline or state.get("pipeline")
    if not pipeline:
        raise UserError("no pipeline recorded for this run; pass --pipeline", path=str(rd))
    # the --var values of the last `tools run` (a variable since removed from the pipeline is ignored)
    plan = Plan(apply_vars(load_pipeline(pipeline), state.get("vars", {}), strict=False), rd)
    t = Table(title=f"{Path(pipeline).name} in {rd}")
    for c in ("step", "status", "seconds", "key figures"):
        t.add_column(c)
    for n in plan.names():
        rec = state["steps"].get(n, {})
        st = step_status(plan, state, n)
        t.add_row(n, st + (resume_note(plan.argv[n]) if st != "done" else ""), str(rec.get("seconds", "")),
                  _figures(plan.outs[n]))
    return t
