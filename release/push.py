"""Upload adapters, GGUF files and the model card to the Hub (huggingface_hub create_repo +
upload_folder), behind the data-use guard.

The guard: an artifact whose lineage is ``credentialed`` (MIMIC and the like) never leaves the
machine when it is a corpus or a dataset. A model or adapter trained on such data goes up only with
``--acknowledge-credentialed-training``, a card (``tools card --acknowledge-credentialed-training``)
that states it, *and* a passing memorization audit (``tools audit``, given among the artifacts) of
every weight file it uploads, matched by sha256: a model that recites its notes shares them. An
audit artifact is evidence only; nothing of it is uploaded (and no manifest ever is, so the canaries
a corpus manifest lists never leave). The token comes from ``HF_TOKEN`` or the HF login and is never
printed or stored.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from tools.artifact import MANIFEST, Artifact, read_artifact
from tools.errors import UserError, WorkError
from tools.io import sha256_file
from tools.progress import log
from tools.stages import AUDIT, in_family

from .card import ACK_CREDENTIALED, DUA_NOTE, HUB_ID

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
MERGE_SUFFIXES = (".safetensors", ".json", ".model", ".jinja", ".txt")
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin")
# data, and statistics of data (an importance matrix holds per-feature activation sums over the corpus text)
DATA_STAGES = ("corpus", "dataset", "build-corpus", "build-dataset", "split", "decontaminate", "imatrix")


def _files_for(art: Artifact, *, adapter_prefix: str) -> list[tuple[Path, str]]:
    st = art.stage
    outs = [o for o in art.outputs() if "/" not in o and o != MANIFEST and not o.startswith(".")]
    if st == "train":
        keep = [o for o in outs if o in ADAPTER_FILES or o in TOKENIZER_FILES]
        if not any(o in ADAPTER_FILES for o in keep):
            raise UserError("train artifact holds no adapter files (full fine-tunes: push the merge artifact)",
                            path=str(art.path))
        return [(art.path / o, adapter_prefix + o) for o in keep]
    if st == "merge":
        return [(art.path / o, o) for o in outs if o.endswith(MERGE_SUFFIXES)]
    if st in ("gguf", "gguf.lora"):
        return [(art.path / o, o) for o in outs if o.endswith(".gguf")]
    if st == "gguf.set":  # every type (TYPE/<name>-TYPE.gguf, every shard of a split one) at the top level
        files = [(art.path / f, f.split("/")[-1]) for f in art.extra.get("shard_files") or art.extra.get("files", [])]
        if not files:
            raise UserError("gguf.set artifact lists no files", path=str(art.path))
        return files
    if st == "card":
        return [(art.path / "README.md", "README.md")]
    if in_family(st, AUDIT):  # evidence for the guard, never uploaded
        return []
    if st == "imatrix":  # one computed from open text may go up beside the GGUFs (llama-imatrix's own format)
        return [(art.path / o, o) for o in outs if o.endswith((".gguf", ".dat"))]
    raise UserError(f"push uploads train (adapter), merge, gguf and card artifacts, not {st!r}", path=str(art.path))


def plan_push(paths, *, acknowledge_credentialed: bool = False) -> tuple[list[tuple[Path, str]], list[Artifact]]:
    """Check the guard and list (local file, path in repo). Refusals are UserErrors saying why."""
    if not paths:
        raise UserError("give the artifacts to upload", field="ARTIFACTS")
    arts = [read_artifact(p) for p in paths]
    for a in arts:  # datasets and corpora: never, when credentialed
        if a.lineage.credentialed and a.stage.split(".")[0] in DATA_STAGES:
            raise UserError(f"refused: this {a.stage} artifact is derived from credentialed data and never leaves "
                            f"this machine. {DUA_NOTE}", path=str(a.path))
    cred = [a for a in arts if a.lineage.credentialed]
    if cred:
        if not acknowledge_credentialed:
            raise UserError("refused: trained on credentialed data (lineage credentialed). Pushing a model or "
                            "adapter trained on it needs --acknowledge-credentialed-training and a card made with "
                            f"that flag. {DUA_NOTE}", path=str(cred[0].path))
        cards = [a for a in arts if a.stage == "card"]
        if not cards or not all(ACK_CREDENTIALED in c.lineage.acknowledgements for c in cards):
            raise UserError("refused: a model trained on credentialed data goes up only with a card that states the "
                            "acknowledgement (tools card ... --acknowledge-credentialed-training)",
                            path=str(cred[0].path))
        _require_audits(cred, [a for a in arts if in_family(a.stage, AUDIT)])
    has_merge = any(a.stage == "merge" for a in arts)
    plan: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for a in arts:
        for local, remote in _files_for(a, adapter_prefix="adapter/" if has_merge else ""):
            if remote in seen:
                if a.stage == "train" and has_merge:
                    continue
                raise UserError(f"two artifacts both provide {remote} (also in {seen[remote]})", path=str(a.path))
            if not local.is_file():
                raise UserError(f"artifact lists {local.name} but it is missing", path=str(a.path))
            seen[remote] = a.path
            plan.append((local, remote))
    if not any(a.stage == "card" for a in arts):
        log("note: no card artifact given; the repository will have no README.md (tools card writes one)")
    return sorted(plan, key=lambda x: x[1]), arts


def _require_audits(cred: list[Artifact], audits: list[Artifact]) -> None:
    """Every weight file a credentialed model artifact uploads needs a passing audit of that exact file."""
    audited: dict[str, bool] = {}
    for a in audits:
        au = a.extra.get("audit") or {}
        for f in au.get("files", []):
            audited[f["sha256"]] = audited.get(f["sha256"], False) or bool(au.get("passed"))
    for a in cred:
        for local, remote in _files_for(a, adapter_prefix=""):
            if not remote.endswith(WEIGHT_SUFFIXES) or not local.is_file():
                continue
            digest = sha256_file(local)
            if digest not in audited:
                raise UserError(f"refused: {remote} was trained on credentialed data and has no memorization audit "
                                f"(sha256 {digest[:12]}...): run `tools audit` on this exact file and give the audit "
                                "artifact to push", path=str(a.path))
            if not audited[digest]:
                raise UserError(f"refused: the memorization audit of {remote} failed (it reproduces training "
                                "text); this file must not be shared", path=str(a.path))


def _scrub(text: str, token: str | None) -> str:
    text = " ".join(str(text).split())
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def push(paths, repo_id: str, *, private: bool = False, dry_run: bool = False, revision: str = "main",
         acknowledge_credentialed: bool = False, commit_message: str = "MediLoRA release") -> dict:
    if not repo_id or not HUB_ID.match(repo_id):
        raise UserError(f"not a Hub repo id (ORG/NAME): {repo_id!r}", field="--repo-id")
    plan, arts = plan_push([Path(p) for p in paths], acknowledge_credentialed=acknowledge_credentialed)
    summary = {"repo_id": repo_id, "private": private, "revision": revision, "dry_run": dry_run,
               "files": [{"path": r, "size": local.stat().st_size} for local, r in plan]}
    if dry_run:
        return summary
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: unset it (HF_HUB_OFFLINE=0) to push", field="HF_HUB_OFFLINE")
    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`", field="HF_TOKEN")
    api = HfApi(token=token)
    tmp = Path(tempfile.mkdtemp(prefix=".medilora-push-"))
    try:
        for local, remote in plan:
            dst = tmp / remote
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local, dst)
            except OSError:
                shutil.copy2(local, dst)
        log(f"creating {repo_id} ({'private' if private else 'public'}) and uploading {len(plan)} files")
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(tmp), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except HfHubHTTPError as e:
        raise WorkError(f"upload to {repo_id} failed: {_scrub(e, token)}") from None
    except (OSError, ValueError) as e:
        raise WorkError(f"upload to {repo_id} failed: {type(e).__name__}: {_scrub(e, token)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["repo_url"] = str(url)
    summary["commit_url"] = getattr(info, "commit_url", None) or str(info)
    return summary
