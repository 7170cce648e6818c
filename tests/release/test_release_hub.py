"""Release: model card and Hub push (loopback HTTP endpoint that records what huggingface_hub sends).

No network: HF_ENDPOINT points at a server on 127.0.0.1 started by the test.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools.artifact import Lineage, Stage
from tools.errors import UserError

TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"
LFS_SUFFIXES = (".gguf", ".safetensors")


# -- a loopback Hub ------------------------------------------------------------------------------

class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.lfs: dict[str, bytes] = {}
        self.commits: list[list[dict]] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, code: int, obj=None):
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: bytes):
                hub.requests.append({"method": self.command, "path": self.path,
                                     "auth": self.headers.get("Authorization"), "size": len(body)})

            def do_POST(self):
                body = self._body()
                self._record(body)
                path = self.path.split("?")[0]
                base = f"http://127.0.0.1:{hub.port}"
                if path == "/api/repos/create":
                    d = json.loads(body)
                    hub.created = d
                    return self._reply(200, {"url": f"{base}/{d.get('organization')}/{d['name']}",
                                             "name": d["name"]})
                if path == "/api/validate-yaml":  # the client checks the README's metadata first
                    import yaml
                    d = json.loads(body)
                    hub.validated.append(d["content"])
                    try:
                        meta = yaml.safe_load(d["content"].split("---")[1])
                        assert isinstance(meta, dict)
                    except Exception as e:  # noqa: BLE001
                        return self._reply(400, {"errors": [{"message": str(e)}]})
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    d = json.loads(body)
                    files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                              "shouldIgnore": False} for f in d["files"]]
                    return self._reply(200, {"files": files})
                if path.endswith(".git/info/lfs/objects/batch"):
                    d = json.loads(body)
                    hub.transfers_offered = d.get("transfers")
                    objs = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                             "actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"}}} for o in d["objects"]]
                    return self._reply(200, {"transfer": "basic", "objects": objs})
                if "/commit/" in path:
                    lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
                    hub.commits.append(lines)
                    return self._reply(200, {"commitUrl": f"{base}/commit/{'1' * 40}", "commitOid": "1" * 40,
                                             "pullRequestUrl": None})
                return self._reply(404, {"error": f"unexpected POST {path}"})

            def do_PUT(self):
                body = self._body()
                self._record(body)
                if self.path.startswith("/lfs-upload/"):
                    hub.lfs[self.path.rsplit("/", 1)[1]] = body
                    return self._reply(200)
                return self._reply(404, {"error": "unexpected PUT"})

            def do_GET(self):
                self._record(b"")
                return self._reply(404, {"error": f"unexpected GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def committed_files(self) -> dict[str, bytes]:
        """path -> content, for every file of every commit (regular inline, LFS from the PUTs)."""
        out = {}
        for lines in self.commits:
            for ln in lines:
                v = ln.get("value", {})
                if ln.get("key") == "file":
                    out[v["path"]] = base64.b64decode(v["content"])
                elif ln.get("key") == "lfsFile":
                    out[v["path"]] = self.lfs[v["oid"]]
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


def push_env(hub: FakeHub) -> dict:
    return {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}


# -- artifacts made here (no training) -------------------------------------------------------------

def make_artifacts(root: Path, *, credentialed: bool = False) -> dict[str, Path]:
    lin = Lineage(credentialed=credentialed, licenses={"Apache-2.0"} if not credentialed else {"PhysioNet-DUA"},
                  sources={"MIMIC-IV notes"} if credentialed else {"PubMedQA"})
    arts = {}
    with Stage("dataset.pubmedqa", root / "dataset", {"n": 2}, lineage=lin) as st:
        st.path("train.jsonl").write_text('{"id": "1", "messages": []}\n')
    arts["dataset"] = root / "dataset"
    with Stage("train", root / "stage" / "output", {"steps": 1}, inputs=[root / "dataset"]) as st:
        st.path("adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        st.path("adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"A" * 2048)
        st.path("tokenizer_config.json").write_text("{}")
        st.path("log_history.json").write_text("[]")
        st.path("checkpoint-1/optimizer.pt").write_bytes(b"opt")
        st.extra.update({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter": "lora"})
    arts["train"] = root / "stage" / "output"
    with Stage("gguf", root / "gguf", {"q": "Q3_K_L"}, inputs=[arts["train"]]) as st:
        st.path("MediLoRA-135M-pubmedqa-Q3_K_L.gguf").write_bytes(b"GGUF" + b"\x00" * 4096)
        st.extra.update({"file": "MediLoRA-135M-pubmedqa-Q3_K_L.gguf", "file_type": "Q3_K_L", "bits_per_weight": 5.69,
                         "requested_type": "Q3_K_L", "primary_type": "Q3_K", "primary_type_share": 0.0,
                         "mostly_applied": False,
                         "tensor_types": {"Q4_0": {"tensors": 120, "elements": 66355200, "bytes": 1},
                                          "Q5_K": {"tensors": 30, "elements": 26542080, "bytes": 1}}})
    arts["gguf"] = root / "gguf"
    with Stage("bench.pubmedqa", root / "bench", {"limit": 40}, inputs=[arts["gguf"]]) as st:
        st.path("results.json").write_text(json.dumps({"task": "pubmedqa", "accuracy": 0.53, "valid_rate": 1.0,
                                                       "n": 40, "mode": "generate"}))
        st.path("items.jsonl").write_text('{"id": "1"}\n')
    arts["bench"] = root / "bench"
    with Stage("compare-quant", root / "gap", {"ctx": 128}, inputs=[arts["gguf"]]) as st:
        st.path("results.json").write_text(json.dumps({
            "ref": {"file_type": "F16", "perplexity": 10.0}, "quant": {"file_type": "Q3_K_L", "perplexity": 10.5},
            "perplexity_ratio": 1.05, "perplexity_delta_pct": 5.0, "mean_kl": 0.0321, "top1_agreement": 0.9,
            "tokens_scored": 254, "text": "text.txt"}))
    arts["gap"] = root / "gap"
    return arts


def fake_audit(out: Path, weights: list[Path], *, passed: bool) -> Path:
    """An audit artifact as `tools audit` writes it (its manifest's extra.audit), made without a model."""
    with Stage("audit", out, {"docs": 50}) as st:
        st.path("audit.json").write_text("{}")
        st.extra["audit"] = {"passed": passed, "files": [{"name": w.name, "sha256": hashlib.sha256(w.read_bytes())
                                                          .hexdigest()} for w in weights],
                             "summary": {"passed": passed, "extraction_rate": 0.0, "extraction_base_rate": 0.0,
                                         "extraction_docs": 50, "membership_auc": 0.512,
                                         "membership_auc_ci95": [0.398, 0.626], "membership_kind": "relative",
                                         "canaries": 4, "max_exposure_bits": 3.5}}
    return out


# -- card ------------------------------------------------------------------------------------------

def test_card_from_manifests_and_eval_results(tmp_path, tools_cli):
    from huggingface_hub import ModelCard

    a = make_artifacts(tmp_path)
    p = tools_cli("card", a["train"], a["gguf"], a["bench"], a["gap"], "--repo-id", "medilora/smollm2-pubmedqa",
                  "--out", tmp_path / "card", "--dataset", "qiaojin/PubMedQA", check=True)
    assert "4 eval results" in p.stdout
    card = ModelCard.load(tmp_path / "card" / "README.md")
    d = card.data.to_dict()
    assert d["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert d["base_model_relation"] == "finetune" and d["library_name"] == "peft"
    assert d["license"] == "apache-2.0" and d["datasets"] == ["qiaojin/PubMedQA"]
    assert {"medical", "gguf", "lora", "q3_k_l"} <= set(d["tags"])
    res = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert res[("pubmedqa", "accuracy")] == 0.53 and res[("pubmedqa", "valid_rate")] == 1.0
    assert res[("quantization gap (text.txt)", "kl_divergence")] == 0.0321
    assert "model-index" in card.content
    assert "| pubmedqa | 53.0% | 100.0% | 40 |" in card.text
    assert "+5.00%" in card.text and "Credentialed data: no" in card.text
    assert "only 0.0% of the weights are Q3_K" in card.text
    # deterministic: same inputs -> same bytes
    tools_cli("card", a["train"], a["gguf"], a["bench"], a["gap"], "--repo-id", "medilora/smollm2-pubmedqa",
              "--out", tmp_path / "card2", "--dataset", "qiaojin/PubMedQA", check=True)
    assert (tmp_path / "card" / "README.md").read_bytes() == (tmp_path / "card2" / "README.md").read_bytes()


def test_card_reads_bench_results_defensively(tmp_path):
    from release.card import build_card

    a = make_artifacts(tmp_path)
    (a["bench"] / "results.json").write_text(json.dumps({"task": "pubmedqa", "accuracy": "high", "n": 3}))
    with pytest.raises(UserError, match=r"results.json \[accuracy\]: accuracy must be a number"):
        build_card([a["train"], a["bench"]], tmp_path / "card")
    (a["bench"] / "results.json").write_text(json.dumps({"task": "pubmedqa", "accuracy": 0.5}))
    with pytest.raises(UserError, match=r"\[n\]: missing n"):
        build_card([a["train"], a["bench"]], tmp_path / "card")
    with pytest.raises(UserError, match="not 'dataset.pubmedqa'"):
        build_card([a["dataset"]], tmp_path / "card")
    assert not (tmp_path / "card").exists()


# -- push ------------------------------------------------------------------------------------------

def _no_token_anywhere(p, root: Path):
    assert TOKEN not in p.stdout and TOKEN not in p.stderr
    for m in root.rglob("manifest.json"):
        assert TOKEN not in m.read_text()
    for f in root.rglob("README.md"):
        assert TOKEN not in f.read_text()


def test_push_uploads_adapter_gguf_and_card_to_loopback_hub(tmp_path, hub, tools_cli):
    a = make_artifacts(tmp_path)
    tools_cli("card", a["train"], a["gguf"], a["bench"], "--repo-id", "org/medilora", "--out", tmp_path / "card",
              check=True)
    dry = tools_cli("push", a["train"], a["gguf"], tmp_path / "card", "--repo-id", "org/medilora", "--dry-run",
                    env=push_env(hub), check=True)
    assert "would upload" in dry.stdout and hub.requests == []

    p = tools_cli("push", a["train"], a["gguf"], tmp_path / "card", "--repo-id", "org/medilora", "--private", "--json",
                  env=push_env(hub))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)["results"]
    files = hub.committed_files()
    assert sorted(files) == ["MediLoRA-135M-pubmedqa-Q3_K_L.gguf", "README.md", "adapter_config.json",
                             "adapter_model.safetensors", "tokenizer_config.json"]
    assert sorted(f["path"] for f in out["files"]) == sorted(files)
    for name in files:  # what arrived is what was on disk
        src = next(tmp_path.rglob(name))
        assert hashlib.sha256(files[name]).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    assert hub.created.get("visibility") == "private" and hub.created["name"] == "medilora"
    assert "basic" in hub.transfers_offered
    assert hub.validated and all("model-index" in c for c in hub.validated)
    # every request carried the token in its header, never anywhere else
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests if r["path"].startswith("/api/"))
    assert not any(TOKEN in r["path"] for r in hub.requests)
    _no_token_anywhere(p, tmp_path)
    assert out["commit_url"].endswith("1" * 40)
    # the commit went to the repository and branch asked for, nowhere else
    commits = [r["path"] for r in hub.requests if "/commit/" in r["path"]]
    assert commits == ["/api/models/org/medilora/commit/main"], commits
    p = tools_cli("push", a["train"], a["gguf"], tmp_path / "card", "--repo-id", "org/medilora", "--revision", "dev",
                  "--json", env=push_env(hub))
    assert p.returncode == 0, p.stderr
    commits = [r["path"] for r in hub.requests if "/commit/" in r["path"]]
    assert commits[-1] == "/api/models/org/medilora/commit/dev", commits
    assert json.loads(p.stdout)["results"]["revision"] == "dev"


def test_push_refuses_credentialed_data_and_needs_acknowledged_card(tmp_path, hub, tools_cli):
    a = make_artifacts(tmp_path, credentialed=True)
    env = push_env(hub)
    # a dataset derived from MIMIC: never, whatever the flags
    p = tools_cli("push", a["dataset"], "--repo-id", "org/x", "--acknowledge-credentialed-training", env=env)
    assert p.returncode == 2 and "never leaves this machine" in p.stderr and "PhysioNet" in p.stderr
    # a model trained on it: refused without the acknowledgement
    p = tools_cli("push", a["train"], a["gguf"], "--repo-id", "org/x", env=env)
    assert p.returncode == 2 and "--acknowledge-credentialed-training" in p.stderr
    # ... and with the flag but no card that states it
    tools_cli("card", a["train"], a["gguf"], "--out", tmp_path / "card-plain", check=True)
    p = tools_cli("push", a["train"], a["gguf"], tmp_path / "card-plain", "--repo-id", "org/x",
                  "--acknowledge-credentialed-training", env=env)
    assert p.returncode == 2 and "card that states the acknowledgement" in p.stderr
    assert "Not for sharing" in (tmp_path / "card-plain" / "README.md").read_text()
    assert hub.requests == [], "nothing may reach the Hub before the guard passes"

    tools_cli("card", a["train"], a["gguf"], "--out", tmp_path / "card", "--acknowledge-credentialed-training",
              check=True)
    text = (tmp_path / "card" / "README.md").read_text()
    assert "trained on credentialed data" in text and "explicitly acknowledged" in text
    # ... and with the card but without a passing memorization audit of each exact file
    weights = [a["train"] / "adapter_model.safetensors", a["gguf"] / "MediLoRA-135M-pubmedqa-Q3_K_L.gguf"]
    push = ("push", a["train"], a["gguf"], tmp_path / "card", "--repo-id", "org/x", "--acknowledge-credentialed-training")
    p = tools_cli(*push, env=env)
    assert p.returncode == 2 and "no memorization audit" in p.stderr and "adapter_model.safetensors" in p.stderr
    only_gguf = fake_audit(tmp_path / "audit-gguf", weights[1:], passed=True)
    p = tools_cli(*push, only_gguf, env=env)
    assert p.returncode == 2 and "adapter_model.safetensors" in p.stderr and "no memorization audit" in p.stderr
    failed = fake_audit(tmp_path / "audit-failed", weights, passed=False)
    p = tools_cli(*push, failed, env=env)
    assert p.returncode == 2 and "audit of adapter_model.safetensors failed" in p.stderr
    stale = fake_audit(tmp_path / "audit-stale", weights, passed=True)
    weights[1].write_bytes(weights[1].read_bytes() + b"\x00")   # the file changed after its audit
    p = tools_cli(*push, stale, env=env)
    assert p.returncode == 2 and "MediLoRA-135M-pubmedqa-Q3_K_L.gguf" in p.stderr and "no memorization audit" in p.stderr
    assert hub.requests == [], "nothing may reach the Hub before the guard passes"
    audit = fake_audit(tmp_path / "audit", weights, passed=True)
    tools_cli("card", a["train"], a["gguf"], audit, "--out", tmp_path / "card", "--acknowledge-credentialed-training",
              check=True)
    text = (tmp_path / "card" / "README.md").read_text()
    assert "## Memorization audit" in text and "| pass | 0.0% / 0.0% of 50 | 0.512 [0.398, 0.626] (relative) | " \
                                                "3.5 bits (4 canaries) |" in text, text
    p = tools_cli(*push[:3], tmp_path / "card", *push[4:], audit, env=env)
    assert p.returncode == 0, p.stderr
    files = hub.committed_files()
    assert "README.md" in files and "adapter_model.safetensors" in files
    assert not any(n.endswith((".jsonl", "manifest.json", ".pt")) for n in files), sorted(files)
    _no_token_anywhere(p, tmp_path)


def test_push_without_token_or_offline_is_a_clear_error(tmp_path, hub, tools_cli):
    a = make_artifacts(tmp_path)
    env = push_env(hub)
    env["HF_TOKEN"] = ""
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no stored login either
    p = tools_cli("push", a["gguf"], "--repo-id", "org/x", env=env)
    assert p.returncode == 2 and "no Hugging Face token" in p.stderr
    env = push_env(hub)
    env["HF_HUB_OFFLINE"] = "1"
    p = tools_cli("push", a["gguf"], "--repo-id", "org/x", env=env)
    assert p.returncode == 2 and "HF_HUB_OFFLINE" in p.stderr
    p = tools_cli("push", a["gguf"], "--repo-id", "not a repo", env=push_env(hub))
    assert p.returncode == 2 and "--repo-id" in p.stderr
    assert hub.requests == []
