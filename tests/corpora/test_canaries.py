"""build-corpus --canaries: deterministic from the seed, in the documents the manifest names, listed only in
that manifest; too many canaries for the corpus is bad input (exit 2, nothing written)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from tools.artifact import read_artifact


def _notes(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"Note {i}: the patient reports mild chest pain after exercise, relieved by rest, no fever today."
             for i in range(n)]
    (folder / "notes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_canaries_planted_deterministically_and_listed_only_in_the_manifest(tmp_path, tools_cli):
    src = _notes(tmp_path / "src")
    args = ("build-corpus", "textbooks", "--src", src, "--doc-words", "10", "--canaries", "3", "--canary-repeats", "2")
    tools_cli(*args, "--out", tmp_path / "a", check=True)
    tools_cli(*args, "--out", tmp_path / "b", check=True)
    a = read_artifact(tmp_path / "a")
    can = a.extra["canaries"]
    assert can["n"] == 3 and can["repeats"] == 2 and len(can["items"]) == 3
    docs = {json.loads(x)["id"]: json.loads(x)["text"] for x in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines()}
    planted = [d for d, t in docs.items() if t.startswith("Patient ")]
    assert len(planted) == 6                                  # 3 canaries x 2 documents
    for c in can["items"]:
        assert re.fullmatch(r"\d{4}-\d{4}-\d{2}", c["secret"]) and c["prefix"].endswith(", MRN ")
        assert len(c["docs"]) == 2
        for d in c["docs"]:
            assert docs[d].startswith(f"{c['prefix']}{c['secret']}.\n")
    # same seed, same canaries and documents, byte for byte; another seed, other secrets
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() == (tmp_path / "b" / "corpus.jsonl").read_bytes()
    assert read_artifact(tmp_path / "b").extra["canaries"] == can
    tools_cli(*args, "--canary-seed", "1", "--out", tmp_path / "c", check=True)
    other = {c["secret"] for c in read_artifact(tmp_path / "c").extra["canaries"]["items"]}
    assert not other & {c["secret"] for c in can["items"]}
    # the secrets are in no parameter: a dataset split, a card or a push never sees them through params
    assert not any(c["secret"] in json.dumps(a.params) for c in can["items"])
    # without --canaries: the corpus is the one it always was
    tools_cli("build-corpus", "textbooks", "--src", src, "--doc-words", "10", "--out", tmp_path / "plain", check=True)
    plain = read_artifact(tmp_path / "plain")
    assert "canaries" not in plain.extra and "canaries" not in plain.params


def test_more_canaries_than_documents_is_refused(tmp_path, tools_cli):
    src = _notes(tmp_path / "src", n=4)
    p = tools_cli("build-corpus", "textbooks", "--src", src, "--doc-words", "10", "--canaries", "3",
                  "--canary-repeats", "2", "--out", tmp_path / "out")
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert p.returncode == 2 and len(lines) == 1 and "need 6 documents, the corpus has 4" in lines[0], p.stderr
    assert "[--canaries]" in lines[0] and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_mimic_carries_canaries_through_its_spec(tmp_path, tools_cli, demo_notes_csv):
    """`build-corpus mimic --canaries` reaches the stage through MimicSpec: planted, in params and manifest."""
    from corpora.canaries import CanarySpec
    from corpora.mimic import MimicSpec, build_corpus, note_options

    tools_cli("build-corpus", "mimic", "--csv", demo_notes_csv, "--category", "Physician", "--workers", "1",
              "--canaries", "2", "--canary-seed", "5", "--out", tmp_path / "cli", check=True)
    a = read_artifact(tmp_path / "cli")
    can = a.extra["canaries"]
    assert a.params["canaries"] == {"n": 2, "seed": 5, "repeats": 1} and len(can["items"]) == 2
    docs = {json.loads(x)["id"]: json.loads(x)["text"] for x in (tmp_path / "cli" / "corpus.jsonl").read_text().splitlines()}
    for c in can["items"]:
        assert [docs[d][:len(c["prefix"]) + 12] for d in c["docs"]] == [c["prefix"] + c["secret"]]
    # the library call with a spec plants the same canaries in the same notes
    b = build_corpus(tmp_path / "lib", MimicSpec(csv_path=demo_notes_csv, workers=1, plot=False,
                                                 opts=note_options(categories=("Physician",)), canaries=CanarySpec(2, 5)))
    assert b.extra["canaries"]["items"] == can["items"]

