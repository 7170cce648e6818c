"""MIMIC-III notes -> corpus, from a real (throw-away) PostgreSQL server and from the CSV."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from corpora.mimic import LICENSE, NoteOptions, build_corpus, redact_dsn
from tools.errors import UserError

HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
          "DESCRIPTION", "CGID", "ISERROR", "TEXT"]

DISCHARGE = """Admission Date:  [**2151-7-16**]       Discharge Date:   [**2151-8-4**]

Service: MEDICINE

Allergies:
Penicillins

Chief Complaint:
shortness of breath

History of Present Illness:
Mr. [**Known lastname 1234**] is a 65 yo man with   CHF (EF 25%) who presents with   3 days of
worsening dyspnea on exertion, orthopnea and "leg swelling", after running out of furosemide.

Past Medical History:
1. Congestive heart failure, ischemic cardiomyopathy
2. Atrial fibrillation, on warfarin

Social History:
Lives alone in [**Location 86**], smokes one pack a day.

Medications on Admission:
Furosemide 40 mg PO daily, warfarin 5 mg PO daily, metoprolol 25 mg PO BID

Pertinent Results:
[**2151-7-16**] 08:15PM   BNP-2150* Na-131 K-4.9 Creat-1.4

Brief Hospital Course:
Diuresed with IV furosemide with good response, 6 L net negative over the stay.
Rate controlled with metoprolol. Seen by Dr. [**First Name (STitle) 2145**] of cardiology.

Discharge Diagnosis:
Acute on chronic systolic heart failure

Discharge Instructions:
Please call [**Telephone/Fax (1) 2010**] if you gain more than 3 lbs.
"""

NURSING = """Nursing progress note.
Assessment:
Pt [**Name (NI) 55**] resting comfortably, lungs with bibasilar crackles, on 2L nasal cannula, sats 96%.
Urine output 1.2 L over the shift after IV furosemide, no chest pain, alert and oriented.
Plan:
Continue diuresis, strict ins and outs, daily weights, monitor potassium after furosemide."""


def _our_rows() -> list[list[str]]:
    """Rows the tests add: placeholders, sections, ISERROR, trailing-space categories, duplicates."""
    return [
        ["1001", "501", "20001", "2151-08-04", "", "", "Discharge summary", "Report", "", "", DISCHARGE],
        # flagged as an error: must be dropped by default
        ["1002", "502", "20002", "2151-08-05", "", "", "Discharge summary", "Report", "", "1",
         DISCHARGE.replace("65 yo man", "70 yo woman")],
        # exact duplicate of 1001 (other ROW_ID): dropped, first one wins
        ["1003", "501", "20001", "2151-08-04", "", "", "Discharge summary", "Report", "", "", DISCHARGE],
        # trailing-space category, as in the raw MIMIC values
        ["1004", "503", "20003", "2151-09-01", "2151-09-01 10:00:00", "", "Nursing/other ", "Progress", "7", "0", NURSING],
        # too short once cleaned
        ["1005", "504", "20004", "2151-09-02", "", "", "Physician ", "Note", "", "",
         "History of Present Illness:\n[**Known firstname 9**] ok."],
    ]


def write_notes_csv(path: Path, shared_csv: Path) -> Path:
    """The synthetic notes (corpora/data/demo_notes) plus our rows, in NOTEEVENTS.csv layout."""
    with open(shared_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == HEADER
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    w.writerows(rows[1:])
    w.writerows(_our_rows())
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def corpus(art) -> list[dict]:
    return [json.loads(line) for line in (art.path / "corpus.jsonl").read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def notes_csv(tmp_path_factory, demo_notes_csv) -> Path:
    return write_notes_csv(tmp_path_factory.mktemp("notes") / "NOTEEVENTS.csv",
                           demo_notes_csv)


@pytest.fixture(scope="module")
def pg(notes_csv, pg_server):
    """The session's PostgreSQL cluster with a database ``mimic`` holding mimiciii.noteevents."""
    import psycopg

    server = pg_server
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE mimic")
    with psycopg.connect(server.dsn("mimic")) as conn:
        conn.execute("CREATE SCHEMA mimiciii")
        conn.execute("""CREATE TABLE mimiciii.noteevents (
            ROW_ID INT NOT NULL, SUBJECT_ID INT NOT NULL, HADM_ID INT, CHARTDATE TIMESTAMP(0),
            CHARTTIME TIMESTAMP(0), STORETIME TIMESTAMP(0), CATEGORY VARCHAR(50), DESCRIPTION VARCHAR(255),
            CGID INT, ISERROR CHAR(1), TEXT TEXT,
            CONSTRAINT noteevents_rowid_pk PRIMARY KEY (ROW_ID))""")
        with conn.cursor() as cur:
            with cur.copy("COPY mimiciii.noteevents FROM STDIN WITH (FORMAT csv, HEADER true, NULL '')") as cp:
                cp.write(notes_csv.read_bytes())
        n = conn.execute("SELECT count(*) FROM mimiciii.noteevents").fetchone()[0]
        assert n == 207 + len(_our_rows())
    return server


def test_postgres_corpus_cleans_filters_and_dedups(pg, tmp_path):
    art = build_corpus(tmp_path / "mimic", dsn=pg.dsn("mimic"), workers=2)
    assert art.stage == "corpus.mimic"
    m = art.manifest
    assert m["lineage"]["credentialed"] is True
    assert LICENSE in m["lineage"]["licenses"] and LICENSE == "PhysioNet Credentialed Health Data License 1.5.0"
    assert "password" not in json.dumps(m["params"])
    docs = corpus(art)
    for line in (art.path / "corpus.jsonl").read_text(encoding="utf-8").split("\n")[:-1]:
        assert line == json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False)
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids, key=lambda s: int(s.split("-")[1])), "ROW_ID order"
    assert all(set(d) == {"id", "text", "source"} for d in docs)
    by_id = {d["id"]: d for d in docs}
    # the discharge summary: chosen sections only, placeholders gone, whitespace normalised
    t = by_id["mimic-1001"]["text"]
    assert "[**" not in t and "**]" not in t
    assert "Mr. is a 65 yo man with CHF (EF 25%) who presents with 3 days of" in t
    for kept in ("History of Present Illness:", "Past Medical History:", "Medications on Admission:",
                 "Pertinent Results:", "Brief Hospital Course:", "Discharge Diagnosis:"):
        assert kept in t, kept
    for dropped in ("Allergies", "Penicillins", "Chief Complaint", "Social History", "smokes",
                    "Discharge Instructions", "Admission Date", "Service:"):
        assert dropped not in t, dropped
    assert "  " not in t and "\n\n\n" not in t and t == t.strip()
    assert by_id["mimic-1001"]["source"] == "mimic-iii/noteevents/discharge_summary"
    assert "mimic-1002" not in by_id, "ISERROR = '1' is dropped"
    assert "mimic-1003" not in by_id, "exact duplicate is dropped"
    assert "mimic-1005" not in by_id, "too short"
    assert by_id["mimic-1004"]["source"] == "mimic-iii/noteevents/nursing_other"
    assert "Continue diuresis" in by_id["mimic-1004"]["text"]
    # the ACI-Bench notes (CHIEF COMPLAINT / REVIEW OF SYSTEMS... on lines of their own)
    t1 = by_id["mimic-1"]["text"]
    assert t1.startswith("HISTORY OF PRESENT ILLNESS\n\nMartha Collins")
    assert "REVIEW OF SYSTEMS" not in t1 and "CHIEF COMPLAINT" not in t1 and "ASSESSMENT AND PLAN" in t1
    st = m["extra"]["stats"]
    assert st["dropped_duplicate"] == 1 and st["kept"] == len(docs)
    assert st["placeholders_removed"] >= 6
    assert (art.path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_postgres_and_csv_give_identical_corpora(pg, notes_csv, tmp_path):
    opts = NoteOptions(categories=("discharge summary", "nursing/other"))
    a = build_corpus(tmp_path / "db", dsn=pg.dsn("mimic"), opts=opts, workers=2)
    b = build_corpus(tmp_path / "csv1", csv_path=notes_csv, opts=opts, workers=1)
    c = build_corpus(tmp_path / "csv2", csv_path=notes_csv, opts=opts, workers=2)
    da = (a.path / "corpus.jsonl").read_bytes()
    assert da == (b.path / "corpus.jsonl").read_bytes() == (c.path / "corpus.jsonl").read_bytes()
    assert [d["id"] for d in corpus(a)] == ["mimic-1001", "mimic-1004"], "category filter ignores trailing spaces"
    # whole notes when the section filter is off
    w = build_corpus(tmp_path / "whole", csv_path=notes_csv, opts=NoteOptions(sections=None), workers=2)
    whole = {d["id"]: d["text"] for d in corpus(w)}
    assert "Allergies:\nPenicillins" in whole["mimic-1001"] and "[**" not in whole["mimic-1001"]
    # same inputs and parameters: the stage is a no-op; the manifest is untouched
    before = (b.path / "manifest.json").read_bytes()
    again = build_corpus(tmp_path / "csv1", csv_path=notes_csv, opts=opts, workers=1)
    assert (again.path / "manifest.json").read_bytes() == before


def test_unreachable_dsn_is_one_line_without_password(tools_cli, tmp_path):
    from tools.pgserver import free_port

    port = free_port()
    dsn = f"host=127.0.0.1 port={port} dbname=mimic user=alice password=s3cr3t-pw connect_timeout=3"
    p = tools_cli("build-corpus", "mimic", "--dsn", dsn, "--out", tmp_path / "out")
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --dsn: cannot connect to PostgreSQL"), p.stderr
    assert f"port={port}" in lines[0] and "user=alice" in lines[0]
    assert "s3cr3t-pw" not in p.stderr + p.stdout
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert "s3cr3t" not in redact_dsn("postgresql://bob:s3cr3t@db.example:5432/mimic")


def test_missing_table_names_schema(pg, tmp_path):
    with pytest.raises(UserError, match=r"table nosuch\.noteevents does not exist"):
        build_corpus(tmp_path / "out", dsn=pg.dsn("mimic"), schema="nosuch")
    assert not (tmp_path / "out").exists()


def _write(path: Path, text: str | bytes) -> Path:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


GOOD = '1,1,,,,,Physician ,d,,,"History of Present Illness:\nline two of the note, with ""quotes"", commas\nline three"\n'


@pytest.mark.parametrize("name,body,where,msg", [
    ("short_row", ",".join(HEADER) + "\n" + GOOD + "2,2,,,,,Physician ,d,,\n", ":5:", "row has 10 fields, header has 11"),
    ("bad_byte", (",".join(HEADER) + "\n" + GOOD).encode() + b'3,3,,,,,Physician ,d,,,"caf\xe9 au lait"\n',
     ":5:", "not UTF-8 (byte 0xe9)"),
    ("no_text", "ROW_ID,SUBJECT_ID,CATEGORY,ISERROR\n1,1,Physician,\n", ":1", "missing column 'TEXT'"),
    ("unterminated", ",".join(HEADER) + "\n" + GOOD + '4,4,,,,,Physician ,d,,,"never closed\nmore\n', ":5:",
     "unterminated quoted field"),
    ("empty", "", "", "empty"),
])
def test_bad_csv_names_file_and_line(tools_cli, tmp_path, name, body, where, msg):
    f = _write(tmp_path / f"{name}.csv", body)
    out = tmp_path / "out"
    p = tools_cli("build-corpus", "mimic", "--csv", f, "--out", out, "--workers", "2")
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr  # progress may precede it
    err = errors[0]
    assert err.startswith(f"error: {f}{where}") and msg in err, err
    assert "Traceback" not in p.stderr
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == [f.name], "no partial output left behind"


def test_csv_gz_and_sections_yaml(notes_csv, tmp_path):
    import gzip

    from corpora.clean import load_section_filter

    gz = tmp_path / "NOTEEVENTS.csv.gz"
    gz.write_bytes(gzip.compress(notes_csv.read_bytes(), mtime=0))
    y = _write(tmp_path / "sections.yaml", "keep: [brief hospital course, Social History]\n")
    art = build_corpus(tmp_path / "out", csv_path=gz, opts=NoteOptions(sections=load_section_filter(y), min_chars=20))
    by_id = {d["id"]: d["text"] for d in corpus(art)}
    assert by_id["mimic-1001"].startswith("Social History:\nLives alone in , smokes")
    assert "Brief Hospital Course:\nDiuresed" in by_id["mimic-1001"] and "Past Medical History" not in by_id["mimic-1001"]
    bad = _write(tmp_path / "bad.yaml", "keep: []\n")
    with pytest.raises(UserError, match=r"bad\.yaml \[keep\]: 'keep' must be a non-empty list"):
        load_section_filter(bad)


def test_section_extraction_edge_cases():
    from corpora.clean import SectionFilter, normalize_whitespace

    sf = SectionFilter()
    text = ("HPI:   chest pain since  morning\nPast Medical History:\n\nDischarge Diagnosis:\t\n"
            "Allergies: none\n  hospital   course :\nstable,\tdischarged home\n\n\n\nFamily History:\nmother CAD")
    out, names = sf.extract(text)
    # same-line content kept; a header with nothing under it dropped; spaces inside headers allowed
    assert out == "HPI: chest pain since morning\n\nhospital course :\nstable, discharged home"
    assert names == ["history of present illness", "hospital course"]
    assert sf.extract("no headers at all\njust text")[1] == []
    assert normalize_whitespace("  a \t b\r\n\n\n\nc  \n") == "a b\n\nc"


def test_arrow_and_csv_module_read_the_same_rows(notes_csv):
    """The fast reader (Arrow) and the strict fallback (csv module) agree on every field."""
    from corpora.mimic import _arrow_rows, _python_rows, csv_tasks

    tasks = list(csv_tasks(notes_csv, block=64 << 10, by_range=False))  # small blocks: many cuts
    assert len(tasks) > 5
    fast = [r for t in tasks for r in _arrow_rows(t[1], t[2])]
    slow = [r for t in tasks for r in _python_rows(t[1], t[2])]
    assert fast == slow and len(fast) == 207 + len(_our_rows())
    assert [r[0] for r in fast] == [str(i) for i in range(1, 208)] + [r[0] for r in _our_rows()]
