"""The artifact contract (docs/ARCHITECTURE.md): one output folder a stage, manifest.json written last.

A stage builds its outputs in a hidden staging folder beside ``out``; on success it writes the
manifest there (atomically) and swaps the staging folder in place of ``out``. A stage killed or
failing half-way leaves at most a hidden ``.<name>.partial-*`` folder that is never read as an
input, and never a half-written ``out``. Given identical inputs and parameters, an existing
complete ``out`` makes the stage a no-op unless ``force``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .errors import UserError
from .io import canonical_json, sha256_bytes, sha256_file, write_json
from .stages import in_family

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


@dataclass
class Lineage:
    credentialed: bool = False
    licenses: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    acknowledgements: set[str] = field(default_factory=set)

    def merge(self, other: "Lineage") -> None:
        self.credentialed = self.credentialed or other.credentialed
        self.licenses |= other.licenses
        self.sources |= other.sources
        self.acknowledgements |= other.acknowledgements

    def to_dict(self) -> dict:
        return {"credentialed": self.credentialed, "licenses": sorted(self.licenses),
                "sources": sorted(self.sources), "acknowledgements": sorted(self.acknowledgements)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Lineage":
        d = d or {}
        return cls(bool(d.get("credentialed", False)), set(d.get("licenses", [])),
                   set(d.get("sources", [])), set(d.get("acknowledgements", [])))


@dataclass
class Artifact:
    """A complete artifact folder (one that has a manifest)."""

    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest.get("stage", "")

    @property
    def lineage(self) -> Lineage:
        return Lineage.from_dict(self.manifest.get("lineage"))

    @property
    def params(self) -> dict:
        return self.manifest.get("params", {})

    @property
    def extra(self) -> dict:
        return self.manifest.get("extra", {})

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            raise UserError(f"artifact has no {name}", path=str(self.path))
        return p

    def outputs(self) -> list[str]:
        return [o["path"] for o in self.manifest.get("outputs", [])]

    @property
    def digest(self) -> str:
        """A hash of what the artifact holds: its outputs' hashes (not its timestamps)."""
        return sha256_bytes(canonical_json(sorted((o["path"], o["sha256"]) for o in self.manifest.get("outputs", []))))


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_artifact(path: str | os.PathLike, stage: str | tuple[str, ...] | None = None) -> Artifact:
    p = Path(path)
    if not p.exists():
        raise UserError("artifact folder not found", path=str(p))
    if not p.is_dir():
        raise UserError("expected an artifact folder", path=str(p))
    mf = p / MANIFEST
    if not mf.is_file():
        raise UserError("not a complete artifact (no manifest.json: the stage that wrote it did not finish)", path=str(p))
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable manifest ({e})", path=str(mf)) from None
    if stage is not None:
        wanted = (stage,) if isinstance(stage, str) else stage
        if not in_family(manifest.get("stage", ""), *wanted):
            raise UserError(f"expected a {' or '.join(wanted)} artifact, got {manifest.get('stage')!r}", path=str(p))
    return Artifact(p, manifest)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _describe_input(path: Path) -> tuple[dict, Lineage | None]:
    if path.is_dir():
        art = read_artifact(path)
        return ({"path": str(path), "kind": "artifact", "stage": art.stage, "sha256": art.digest},
                art.lineage)
    if not path.exists():
        raise UserError("input not found", path=str(path))
    return ({"path": str(path), "kind": "file", "sha256": sha256_file(path), "size": path.stat().st_size}, None)


def _refuse_foreign(out: Path) -> None:
    """A stage replaces only its own kind of folder: an artifact (it has a manifest), an empty
    folder, or ``output/`` inside an artifact (``tools train --adopt`` takes over its files). A
    user's file or folder is never moved or replaced."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise UserError("exists and is not an artifact folder (a file): refusing to replace it; "
                        "choose another --out", path=str(out), field="--out")
    if is_artifact(out) or is_artifact(out.parent) or not any(out.iterdir()):
        return
    raise UserError("is a folder with files but no manifest.json (not a MediLoRA artifact): refusing to "
                    "replace it; choose another --out", path=str(out), field="--out")


# The fingerprint (the cache key: same fingerprint, the stage does nothing) is computed from a normalised
# spec, not from the parameter names of the code: renamed keys are mapped back to the name they had when
# the runs were made, and a parameter added later is left out while it has its old behaviour's value.
# Version 1 is the layout the first runs were fingerprinted with, so it adds no version key.
FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class SpecRule:
    """How a stage's parameters map to its fingerprint spec: ``renamed`` {new key: old key} keeps old runs'
    fingerprints across a rename; a key whose value equals ``defaults[key]`` is left out (a parameter added
    later, at the value that behaves as before it existed)."""

    renamed: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


def fingerprint_spec(name: str, params: dict, inputs: list[dict], rule: SpecRule | None = None) -> dict:
    """What a stage's fingerprint hashes: stage name, the normalised parameters, the inputs' hashes."""
    rule = rule or SpecRule()
    spec = {rule.renamed.get(k, k): v for k, v in params.items() if not (k in rule.defaults and v == rule.defaults[k])}
    doc = {"stage": name, "params": spec, "inputs": [(i["kind"], i["sha256"]) for i in inputs]}
    if FINGERPRINT_VERSION > 1:
        doc["version"] = FINGERPRINT_VERSION
    return doc


class Stage:
    """Context manager that runs one stage under the artifact contract.

    >>> with Stage("build-corpus.textbooks", out, params, inputs=[src]) as st:
    ...     if st.skipped: return st.result
    ...     write(st.path("corpus.jsonl"))
    """

    def __init__(self, name: str, out: str | os.PathLike, params: dict[str, Any],
                 inputs: Iterable[str | os.PathLike] = (), *, force: bool = False,
                 lineage: Lineage | None = None, log=None, spec_rule: SpecRule | None = None):
        self.name = name
        self.out = Path(out)
        self.params = params
        self.force = force
        self.lineage = Lineage()
        self.extra: dict[str, Any] = {}
        self.skipped = False
        self.result: Artifact | None = None
        self._log = log
        self.inputs: list[dict] = []
        for raw in inputs:
            desc, lin = _describe_input(Path(raw))
            self.inputs.append(desc)
            if lin is not None:
                self.lineage.merge(lin)
        if lineage is not None:
            self.lineage.merge(lineage)
        self.fingerprint = sha256_bytes(canonical_json(fingerprint_spec(name, params, self.inputs, spec_rule)))
        self.work: Path | None = None

    # -- skip logic ---------------------------------------------------------------------------
    def _existing_matches(self) -> Artifact | None:
        if not is_artifact(self.out):
            return None
        try:
            art = read_artifact(self.out)
        except UserError:
            return None
        if art.manifest.get("fingerprint") != self.fingerprint:
            return None
        for o in art.manifest.get("outputs", []):
            f = self.out / o["path"]
            if not f.is_file() or f.stat().st_size != o["size"]:
                return None
        return art

    def __enter__(self) -> "Stage":
        if not self.force:
            existing = self._existing_matches()
            if existing is not None:
                self.skipped = True
                self.result = existing
                if self._log:
                    self._log(f"{self.name}: up to date in {self.out} (same inputs and parameters; --force re-runs)")
                return self
        _refuse_foreign(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self.started = _now()
        return self

    def path(self, name: str) -> Path:
        """Where to write output ``name`` (inside the staging folder)."""
        assert self.work is not None, "stage was skipped"
        p = self.work / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def __exit__(self, exc_type, exc, tb):
        if self.skipped:
            return False
        if exc_type is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            return False
        self.result = self.commit()
        return False

    def commit(self) -> Artifact:
        assert self.work is not None
        outputs = []
        for f in sorted(self.work.rglob("*")):
            if f.is_file() and f.name != MANIFEST:
                rel = f.relative_to(self.work).as_posix()
                outputs.append({"path": rel, "sha256": sha256_file(f), "size": f.stat().st_size})
        manifest = {
            "schema": SCHEMA_VERSION,
            "stage": self.name,
            "tool": "medilora",
            "tool_version": __version__,
            "params": self.params,
            "inputs": self.inputs,
            "outputs": outputs,
            "lineage": self.lineage.to_dict(),
            "fingerprint": self.fingerprint,
            "extra": self.extra,
            "started": self.started,
            "finished": _now(),
        }
        write_json(self.work / MANIFEST, manifest)  # last act inside the staging folder
        old = None
        _refuse_foreign(self.out)  # again: something may have appeared there meanwhile
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
        os.replace(self.work, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Artifact(self.out, manifest)


@contextlib.contextmanager
def staged_file(out: str | os.PathLike):
    """Yield a temp path beside ``out``; rename it to ``out`` on success, delete it on failure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
