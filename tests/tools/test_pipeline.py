"""`tools run` over real verbs — skip done steps, detect stale ones, resume after a failure."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tools.artifact import read_artifact


def _pipeline(tmp_path, src):
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(f"""
        name: small
        vars:
          books: {src}
        steps:
          - name: books
            run: build-corpus textbooks --src {{vars.books}} --doc-words 40 --min-chars 10
          - name: pubmedqa
            run: build-dataset pubmedqa
          - name: split
            run: split {{steps.pubmedqa.out}} --ratios 0.8,0.1,0.1 --seed 1
    """))
    return p


def _books(tmp_path, text):
    d = tmp_path / "books"
    d.mkdir(exist_ok=True)
    (d / "a.txt").write_text(text)
    return d


TEXT = ("Heart failure is a clinical syndrome caused by structural or functional cardiac abnormality.\n"
        "Symptoms\nDyspnea, orthopnea and fatigue are typical symptoms of the disease in adults.\n\n" * 5)


def test_run_skips_done_steps_and_reruns_stale(tmp_path, tools_cli):
    books = _books(tmp_path, TEXT)
    p = _pipeline(tmp_path, books)
    run = tmp_path / "run"
    r = tools_cli("run", p, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    for step in ("books", "pubmedqa", "split"):
        assert read_artifact(run / step)
    assert read_artifact(run / "split").lineage.licenses  # carried from PubMedQA
    first = json.loads((run / "run.json").read_text())
    r = tools_cli("run", p, "--run-dir", run)
    assert r.returncode == 0 and r.stderr.count("[done]") == 3, r.stderr
    s = tools_cli("status", run)
    assert s.returncode == 0 and s.stdout.count("done") >= 3
    # change an input byte: only the step that reads it re-runs
    (books / "a.txt").write_text(TEXT.replace("Dyspnea", "Dyspnoea"))
    r = tools_cli("run", p, "--run-dir", run)
    assert r.returncode == 0
    assert "[run ] books" in r.stderr and "[done] pubmedqa" in r.stderr and "[done] split" in r.stderr
    second = json.loads((run / "run.json").read_text())
    assert second["steps"]["books"]["digest"] != first["steps"]["books"]["digest"]
    assert second["steps"]["split"] == first["steps"]["split"]


def test_a_step_rerun_to_the_same_bytes_skips_what_follows(tmp_path, tools_cli):
    """Content-addressed: blank lines added to the source make the corpus step run again, its corpus comes out
    byte for byte the same, so the step that reads it is not run again (as a resumed training merged into the
    same weights skips the conversion, quantization and bench after the merge)."""
    books = _books(tmp_path, TEXT)
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(f"""
        name: addressed
        steps:
          - name: books
            run: build-corpus textbooks --src {books} --doc-words 40 --min-chars 10
          - name: clean
            run: decontaminate --train {{steps.books.out}} --against pubmedqa
    """))
    run = tmp_path / "run"
    assert tools_cli("run", p, "--run-dir", run).returncode == 0
    first = json.loads((run / "run.json").read_text())["steps"]
    with open(books / "a.txt", "a") as f:
        f.write("\n\n\n")
    r = tools_cli("run", p, "--run-dir", run)
    assert r.returncode == 0 and "[run ] books" in r.stderr, r.stderr
    assert "[done] clean (skipped: same command and inputs)" in r.stderr, r.stderr
    again = json.loads((run / "run.json").read_text())["steps"]
    assert again["books"]["digest"] == first["books"]["digest"] and again["clean"] == first["clean"]
    assert again["books"]["files"] != first["books"]["files"]   # it did read the changed source
    # a source that changes the corpus runs the next step again
    (books / "a.txt").write_text(TEXT.replace("Dyspnea", "Dyspnoea"))
    r = tools_cli("run", p, "--run-dir", run)
    assert "[run ] books" in r.stderr and "[run ] clean" in r.stderr, r.stderr


def test_status_judges_steps_with_the_runs_var_values(tmp_path, tools_cli):
    """A run made with --var (make demo passes the notes source that way) reads as done, not stale."""
    default = _books(tmp_path, TEXT)
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text(TEXT.replace("Heart", "Cardiac"))
    p = _pipeline(tmp_path, default)
    run = tmp_path / "run"
    r = tools_cli("run", p, "--run-dir", run, "--until", "books", "--var", f"books={other}")
    assert r.returncode == 0, r.stderr
    s = tools_cli("status", run)
    row = next(x for x in s.stdout.splitlines() if x.strip("│ ").startswith("books"))
    assert "done" in row and "stale" not in row, s.stdout
    r = tools_cli("run", p, "--run-dir", run, "--until", "books")   # back to the default source
    assert "[run ] books" in r.stderr
    row = next(x for x in tools_cli("status", run).stdout.splitlines() if x.strip("│ ").startswith("books"))
    assert "done" in row


def test_failed_step_stops_and_resumes(tmp_path, tools_cli):
    books = _books(tmp_path, TEXT)
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(f"""
        steps:
          - name: books
            run: build-corpus textbooks --src {books} --doc-words 40 --min-chars 10
          - name: broken
            run: build-corpus textbooks --src {tmp_path}/missing
          - name: after
            run: build-dataset pubmedqa
    """))
    run = tmp_path / "run"
    r = tools_cli("run", p, "--run-dir", run)
    assert r.returncode == 2 and "step 'broken' failed" in r.stderr
    assert not (run / "after").exists() and not (run / "broken").exists()
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "b.txt").write_text(TEXT)
    r = tools_cli("run", p, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert "[done] books" in r.stderr and "[run ] broken" in r.stderr and "[run ] after" in r.stderr


def _dry_run_refused(tmp_path, tools_cli, text: str, message: str) -> Path:
    """Write a pipeline file, dry-run it, check it is refused (exit 2) with `message`; the file's path."""
    p = tmp_path / "p.yaml"
    p.write_text(text)
    r = tools_cli("run", p, "--dry-run")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    return p


def test_dry_run_and_bad_pipeline(tmp_path, tools_cli):
    p = _dry_run_refused(tmp_path, tools_cli, "steps:\n  - name: a\n    run: split {steps.nope.out}\n",
                         "no earlier step is named 'nope'")
    p.write_text("steps: [\n")
    r = tools_cli("run", p)
    assert r.returncode == 2 and "malformed YAML" in r.stderr and str(p) in r.stderr


def test_shipped_pipelines_pass_dry_run(repo, tools_cli, tmp_path):
    for name in ("medilora", "demo"):
        r = tools_cli("run", repo / "recipes" / "pipelines" / f"{name}.yaml", "--dry-run", "--run-dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("[to do]") >= 15
    r = tools_cli("run", repo / "recipes" / "pipelines" / "medilora.yaml", "--dry-run", "--run-dir", tmp_path / "m")
    assert "--gpus 4 --shard zero2" in r.stdout and "quantize" in r.stdout and "--q Q3_K_L" in r.stdout
    # a quality budget instead of a fixed type (tools quantize --budget), options checked by the dry run
    r = tools_cli("run", repo / "recipes" / "pipelines" / "medilora.yaml", "--dry-run", "--run-dir", tmp_path / "b",
                  "--var", "quant=--budget kl=0.05 --max-ram 8G --ctx 4096")
    assert r.returncode == 0, r.stderr
    assert "quantize" in r.stdout and "--budget kl=0.05 --max-ram 8G --ctx 4096" in r.stdout


def test_dry_run_catches_unknown_verbs_and_options(tmp_path, tools_cli):
    _dry_run_refused(tmp_path, tools_cli, "steps:\n  - name: a\n    run: build-corpus textbook --src x\n",
                     "no verb 'textbook'")
    _dry_run_refused(tmp_path, tools_cli, "steps:\n  - name: a\n    run: build-corpus textbooks --src x --colour red\n",
                     "no option --colour")
