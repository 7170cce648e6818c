"""The data users really have, and the inputs that go wrong: MIMIC-IV-Note from CSV(.gz)
and PostgreSQL, damaged .gz / oversized fields, exact line numbers, duplicate ids, repeated JSON
keys, upstream nulls, one-line textbooks, an existing path as --out, the upstream exports of
PubMedQA / MedQA, and no network at run time."""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest

from corpora.mimic import SOURCE_IV, NoteOptions, build, build_corpus, csv_tasks, pg_ident
from tools.errors import UserError

IV_HEADER = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
III_HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
              "DESCRIPTION", "CGID", "ISERROR", "TEXT"]

DISCHARGE_IV = """ \nName:  ___                     Unit No:   ___\n \nAdmission Date:  ___              Discharge Date:   ___\n \nDate of Birth:  ___             Sex:   M\n \nService: MEDICINE\n \nAllergies: \nPenicillins\n \nAttending: ___.\n \nChief Complaint:\nshortness of breath\n \nHistory of Present Illness:\nMr. ___ is a {age} yo man with CHF (EF 25%) who presents with   3 days of\nworsening dyspnea on exertion, after running out of furosemide at ___.\n \nPast Medical History:\n1. Congestive heart failure\n2. Atrial fibrillation, on warfarin\n \nSocial History:\n___\n \nBrief Hospital Course:\nDiuresed with IV furosemide, 6 L net negative. Seen by Dr. ___ of cardiology.\n \nDischarge Diagnosis:\nAcute on chronic systolic heart failure\n \nDischarge Instructions:\nPlease call ___ if you gain more than 3 lbs.\n"""  # noqa: E501

RADIOLOGY_IV = """EXAMINATION:  CHEST (PA AND LAT)\n\nINDICATION:  ___ year old man with dyspnea, evaluate for effusion.\n\nTECHNIQUE:  Chest PA and lateral\n\nCOMPARISON:  ___\n\nFINDINGS: \n\nModerate bilateral pleural effusions with adjacent atelectasis. Mild pulmonary vascular congestion.\nCardiomediastinal silhouette is enlarged, unchanged.\n\nIMPRESSION: \n\nModerate bilateral pleural effusions and mild pulmonary edema, consistent with heart failure.\n"""  # noqa: E501


def iv_rows() -> list[list]:
    """In the order PostgreSQL returns them (subject, note_seq, note_id)."""
    return [
        ["10000032-RR-14", "10000032", "", "RR", "14", "2180-05-06 21:19:00", "", RADIOLOGY_IV],
        ["10000032-DS-21", "10000032", "22595853", "DS", "21", "2180-05-07 00:00:00", "2180-05-09 15:26:00",
         DISCHARGE_IV.format(age=65)],
        ["10000032-DS-22", "10000032", "22841357", "DS", "22", "2180-06-27 00:00:00", "", DISCHARGE_IV.format(age=66)],
        # same id, other text: the first is kept, this one counted
        ["10000032-DS-22", "10000032", "22841357", "DS", "22", "2180-06-27 00:00:00", "", DISCHARGE_IV.format(age=67)],
        # exact copy of the first note under another id: a plain duplicate
        ["10000084-DS-17", "10000084", "23052089", "DS", "17", "2160-11-25 00:00:00", "", DISCHARGE_IV.format(age=65)],
    ]


def write_csv(path: Path, header, rows, gz: bool = False) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def corpus(art) -> list[dict]:
    return [json.loads(x) for x in (art.path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]


def one_error_line(p, start: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr
    assert errors[0].startswith(start), (errors[0], start)
    return errors[0]


# -- MIMIC-IV-Note from CSV(.gz) ------------------------------------------------------------------
def check_iv_corpus(art, expect_rad: bool = True):
    docs = {d["id"]: d for d in corpus(art)}
    ds = docs["mimic-iv-10000032-DS-21"]
    assert ds["source"] == "mimic-iv/note/discharge"
    t = ds["text"]
    assert "___" not in t and "Mr. is a 65 yo man with CHF (EF 25%) who presents with 3 days of" in t
    for kept in ("History of Present Illness:", "Past Medical History:", "Brief Hospital Course:", "Discharge Diagnosis:"):
        assert kept in t, kept
    for dropped in ("Allergies", "Penicillins", "Chief Complaint", "Social History", "Name:", "Discharge Instructions"):
        assert dropped not in t, dropped
    assert "66 yo" in docs["mimic-iv-10000032-DS-22"]["text"], "first of two notes with one id wins"
    assert "mimic-iv-10000084-DS-17" not in docs, "exact duplicate text dropped"
    if expect_rad:
        rad = docs["mimic-iv-10000032-RR-14"]
        assert rad["source"] == "mimic-iv/note/radiology"
        assert rad["text"].startswith("FINDINGS:\n\nModerate bilateral pleural effusions")
        assert "IMPRESSION:" in rad["text"] and "INDICATION" not in rad["text"] and "TECHNIQUE" not in rad["text"]
    st = art.extra["stats"]
    assert st["dropped_duplicate_id"] == 1 and st["dropped_duplicate"] == 1
    assert st["rows"] == st["kept"] + sum(v for k, v in st.items() if k.startswith("dropped_"))
    assert art.extra["version"] == "iv" and art.params["source"]["version"] == "iv"
    m = art.manifest["lineage"]
    assert m["credentialed"] is True and SOURCE_IV in m["sources"]
    return docs


@pytest.mark.parametrize("gz,workers", [(True, 2), (False, 1)])
def test_mimic_iv_csv(tmp_path, gz, workers):
    src = write_csv(tmp_path / ("discharge.csv.gz" if gz else "discharge.csv"), IV_HEADER, iv_rows(), gz=gz)
    art = build_corpus(tmp_path / "out", csv_path=src, workers=workers, plot=False)
    docs = check_iv_corpus(art)
    assert len(docs) == 3
    # the note type filter: by code or by name
    for cat in ("rr", "radiology"):
        a = build_corpus(tmp_path / f"rad-{cat}", csv_path=src, opts=NoteOptions(categories=(cat,)), plot=False)
        assert [d["id"] for d in corpus(a)] == ["mimic-iv-10000032-RR-14"]


def test_mimic_iv_cli_and_version_flag(tmp_path, tools_cli):
    src = write_csv(tmp_path / "discharge.csv.gz", IV_HEADER, iv_rows(), gz=True)
    p = tools_cli("build-corpus", "mimic", "--csv", src, "--out", tmp_path / "out", "--json", "--workers", "2")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["manifest"]["extra"]["version"] == "iv" and res["manifest"]["extra"]["stats"]["kept"] == 3
    # told it is MIMIC-III, the file is refused on its columns
    p = tools_cli("build-corpus", "mimic", "--csv", src, "--version", "iii", "--out", tmp_path / "o3")
    err = one_error_line(p, f"error: {src}:1 [ROW_ID]: missing column 'ROW_ID'")
    assert "NOTE_ID" in err and not (tmp_path / "o3").exists()
    # --refuse-duplicate-ids names the id and the line of the second copy (header 1, one line a row... not
    # here: the notes hold newlines, so the line is counted)
    p = tools_cli("build-corpus", "mimic", "--csv", src, "--refuse-duplicate-ids", "--out", tmp_path / "o4")
    want_line = 1 + sum(r[-1].count("\n") + 1 for r in iv_rows()[:3]) + 1
    err = one_error_line(p, f"error: {src}:{want_line}: duplicate note id '10000032-DS-22'")
    assert not (tmp_path / "o4").exists()


def _iii_row(rid: int, text: str) -> list:
    return [rid, 1, "", "", "", "", "Discharge summary", "", "", "", text]


NOTE_III = "History of Present Illness:\n{}\nsecond line with enough words to pass the length filter here."


@pytest.mark.parametrize("version", ["iii", "iv"])
@pytest.mark.parametrize("block,workers", [(1 << 20, 1), (512, 1), (512, 2)])
def test_duplicate_ids_kept_first_or_refused(tmp_path, version, block, workers):
    """Second copy of an id in the same block or a later one (tiny blocks), 1 or 2 workers."""
    rows = []
    for i in range(40):
        text = NOTE_III.format(f"patient number {i} presents with symptoms")
        rows.append([f"1-DS-{i}", 1, 2, "DS", i, "", "", text] if version == "iv" else _iii_row(100 + i, text))
    dup_text = NOTE_III.format("a different note under a reused id")
    dup = ["1-DS-7", 1, 2, "DS", 7, "", "", dup_text] if version == "iv" else _iii_row(107, dup_text)
    rows.insert(30, dup)
    src = write_csv(tmp_path / "notes.csv", IV_HEADER if version == "iv" else III_HEADER, rows)
    opts = NoteOptions(min_chars=20)
    stats = build(csv_tasks(src, block=block), tmp_path / "o.jsonl", opts, workers, str(src))
    ids = [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 40 and stats["dropped_duplicate_id"] == 1
    assert "reused id" not in (tmp_path / "o.jsonl").read_text()
    line = 2 + 30 * 3   # header, then 3 lines a note
    with pytest.raises(UserError, match=rf"notes\.csv:{line}: duplicate note id '(1-DS-7|107)'"):
        build(csv_tasks(src, block=block), tmp_path / "r.jsonl", opts, workers, str(src), refuse_duplicate_ids=True)


# -- MIMIC in PostgreSQL: mimiciv_note, and identifiers as the DDL scripts write them -------------
@pytest.fixture(scope="module")
def pg_iv(tmp_path_factory, pg_server):
    """The session's PostgreSQL cluster with databases ``mimiciv`` (mimic-code's schema) and ``mimic3``."""
    import psycopg

    tmp = tmp_path_factory.mktemp("pgiv")
    iv_csv = write_csv(tmp / "discharge.csv", IV_HEADER, iv_rows())
    server = pg_server
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE mimiciv")
    with psycopg.connect(server.dsn("mimiciv")) as conn:
        # mimic-code's mimic-iv-note/buildmimic/postgres/create.sql (no primary key on note_id)
        conn.execute("CREATE SCHEMA mimiciv_note")
        for t in ("discharge", "radiology"):
            conn.execute(f"""CREATE TABLE mimiciv_note.{t} (note_id CHAR(25) NOT NULL, subject_id INTEGER NOT NULL,
                hadm_id INTEGER, note_type CHAR(2) NOT NULL, note_seq INTEGER NOT NULL,
                charttime TIMESTAMP NOT NULL, storetime TIMESTAMP, text TEXT NOT NULL)""")
        with conn.cursor() as cur:
            with cur.copy("COPY mimiciv_note.discharge FROM STDIN WITH (FORMAT csv, HEADER true, NULL '')") as cp:
                cp.write(iv_csv.read_bytes())
        conn.execute("INSERT INTO mimiciv_note.radiology SELECT * FROM mimiciv_note.discharge WHERE note_type = 'RR'")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE mimic3")
    with psycopg.connect(server.dsn("mimic3")) as conn:
        # MIMIC-III as the official DDL writes it: upper case, unquoted (stored lower case) ...
        conn.execute("CREATE SCHEMA MIMICIII")
        conn.execute("""CREATE TABLE MIMICIII.NOTEEVENTS (ROW_ID INT NOT NULL, SUBJECT_ID INT NOT NULL, HADM_ID INT,
            CHARTDATE TIMESTAMP(0), CHARTTIME TIMESTAMP(0), STORETIME TIMESTAMP(0), CATEGORY VARCHAR(50),
            DESCRIPTION VARCHAR(255), CGID INT, ISERROR CHAR(1), TEXT TEXT)""")
        conn.execute("INSERT INTO MIMICIII.NOTEEVENTS (ROW_ID, SUBJECT_ID, CATEGORY, TEXT) VALUES (1, 1, 'Nursing', %s)",
                     (NOTE_III.format("an upper-case DDL note"),))
        # ... and a table someone created with quoted upper-case names
        conn.execute('CREATE SCHEMA "Quoted"')
        conn.execute('CREATE TABLE "Quoted"."NOTES" ("ROW_ID" INT, "CATEGORY" TEXT, "ISERROR" CHAR(1), "TEXT" TEXT)')
        conn.execute('INSERT INTO "Quoted"."NOTES" VALUES (5, \'Nursing\', NULL, %s)',
                     (NOTE_III.format("a quoted-name note"),))
    return server, iv_csv


def test_mimiciv_note_schema_auto_and_same_as_csv(pg_iv, tmp_path):
    server, iv_csv = pg_iv
    dsn = server.dsn("mimiciv")
    # no schema/table given: mimiciii.noteevents is absent in this database, mimiciv_note.discharge is found
    db = build_corpus(tmp_path / "db", dsn=dsn, workers=2, plot=False)
    assert db.params["source"]["schema"] == "mimiciv_note" and db.params["source"]["table"] == "discharge"
    assert db.params["source"]["snapshot"] == {"rows": 5, "max_note_id": "10000084-DS-17"}
    check_iv_corpus(db)
    fromcsv = build_corpus(tmp_path / "csv", csv_path=iv_csv, workers=1, plot=False)
    assert (db.path / "corpus.jsonl").read_bytes() == (fromcsv.path / "corpus.jsonl").read_bytes()
    # unquoted upper-case names fold to lower case; the radiology table with --version iv
    rad = build_corpus(tmp_path / "rad", dsn=dsn, schema="MIMICIV_NOTE", table="RADIOLOGY", version="iv", plot=False)
    assert [d["id"] for d in corpus(rad)] == ["mimic-iv-10000032-RR-14"]
    with pytest.raises(UserError, match="refuse-duplicate-ids"):
        build_corpus(tmp_path / "strict", dsn=dsn, refuse_duplicate_ids=True, dedup=False, plot=False)


@pytest.mark.parametrize("schema,table,expect", [
    ("MIMICIII", "NOTEEVENTS", "mimic-1"),          # the official DDL's spelling
    ("mimiciii", "noteevents", "mimic-1"),
    ('"Quoted"', '"NOTES"', "mimic-5"),             # quoted: taken as written
])
def test_identifiers_resolved_as_postgresql_does(pg_iv, tmp_path, schema, table, expect):
    server, _ = pg_iv
    art = build_corpus(tmp_path / "o", dsn=server.dsn("mimic3"), schema=schema, table=table, plot=False,
                       opts=NoteOptions(min_chars=20))
    assert [d["id"] for d in corpus(art)] == [expect] and art.extra["version"] == "iii"


@pytest.mark.parametrize("schema,table,msg", [
    ("Quoted", "NOTES", r"table quoted\.notes does not exist; a table Quoted\.NOTES exists: .*--schema '\"Quoted\"' "
                        r"--table '\"NOTES\"'"),
    ("nosuch", None, r"table nosuch\.noteevents does not exist \(nor nosuch\.discharge\); schema nosuch does not exist"),
    ("mimiciv_note", "radiology_x", r"table mimiciv_note\.radiology_x does not exist"),
])
def test_missing_tables_explained(pg_iv, tmp_path, schema, table, msg):
    server, _ = pg_iv
    with pytest.raises(UserError, match=msg):
        build_corpus(tmp_path / "o", dsn=server.dsn("mimic3" if schema == "Quoted" else "mimiciv"), schema=schema,
                     table=table)
    assert not (tmp_path / "o").exists()


def test_pg_ident():
    assert pg_ident("NOTEEVENTS") == "noteevents" and pg_ident(" MimicIII ") == "mimiciii"
    assert pg_ident('"NoteEvents"') == "NoteEvents" and pg_ident('"a""b"') == 'a"b'
    assert pg_ident("ÉTÉ") == "ÉtÉ", "only ASCII letters fold (UTF-8 server)"


# -- damaged inputs ---------------------------------------------------------------------------------
def _gz_variants(tmp_path: Path, name: str, data: bytes) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message start after 'error: FILE')."""
    good = gzip.compress(data, mtime=0)
    lines_before = data[: len(data) * 2 // 3].count(b"\n")
    out = {}
    p = tmp_path / f"trunc-{name}"
    p.write_bytes(good[: len(good) * 2 // 3])
    out["truncated"] = (p, ":", "truncated gzip file")
    p = tmp_path / f"plain-{name}"
    p.write_bytes(data)
    out["plain"] = (p, ": ", "not a gzip file, though its name ends in .gz")
    crc = bytearray(good)
    crc[-8] ^= 0xFF                                  # the CRC32 in the trailer
    p = tmp_path / f"crc-{name}"
    p.write_bytes(bytes(crc))
    out["crc"] = (p, ":", "corrupt gzip data")
    p = tmp_path / f"junk-{name}"
    p.write_bytes(good + b"this is not gzip")
    out["trailing-junk"] = (p, ":", "corrupt gzip data")
    assert lines_before > 3
    return out


def _notes_csv_bytes(n: int = 300) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(III_HEADER)
    for i in range(n):
        w.writerow(_iii_row(i + 1, NOTE_III.format(f"note {i} " + "words " * 30)))
    return buf.getvalue().encode()


@pytest.mark.parametrize("case", ["truncated", "plain", "crc", "trailing-junk"])
def test_damaged_gz_mimic(tmp_path, case):
    f, sep, msg = _gz_variants(tmp_path, "NOTEEVENTS.csv.gz", _notes_csv_bytes())[case]
    with pytest.raises(UserError) as e:
        build_corpus(tmp_path / "out", csv_path=f, workers=2, plot=False)
    text = str(e.value)
    assert text.startswith(f"{f}{sep}") and msg in text and "\n" not in text, text
    if sep == ":":
        line = int(text[len(str(f)) + 1:].split(":", 1)[0])
        assert 1 < line <= _notes_csv_bytes().count(b"\n") + 1
    assert not (tmp_path / "out").exists()


def test_truncated_gz_line_is_where_the_data_stops(tmp_path):
    data = b"".join(b'{"id": %d}\n' % i for i in range(20000))
    good = gzip.compress(data, mtime=0)
    f = tmp_path / "t.jsonl.gz"
    f.write_bytes(good[:len(good) // 2])
    import zlib
    readable = zlib.decompressobj(31).decompress(good[:len(good) // 2])
    line = readable.count(b"\n") + 1
    from tools.io import read_jsonl
    with pytest.raises(UserError, match=rf"t\.jsonl\.gz:{line}: truncated gzip file"):
        list(read_jsonl(f))


@pytest.mark.parametrize("case", ["truncated", "plain", "crc"])
@pytest.mark.parametrize("kind", ["qa-csv", "qa-jsonl", "guidelines", "medqa"])
def test_damaged_gz_other_verbs(tmp_path, case, kind):
    from corpora.guidelines import build_corpus as guidelines
    from corpora.qa import build_qa
    from corpora.sft import build_medqa

    n = 400
    if kind == "qa-csv":
        data = ("question,answer\n" + "".join(f"q{i} what?,a{i}\n" for i in range(n))).encode()
        name, run = "qa.csv.gz", lambda f: build_qa(f, tmp_path / "o", question_col="question", answer_col="answer")
    elif kind == "qa-jsonl":
        data = "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(n)).encode()
        name, run = "qa.jsonl.gz", lambda f: build_qa(f, tmp_path / "o", question_col="question", answer_col="answer")
    elif kind == "guidelines":
        data = "".join(json.dumps({"id": str(i), "source": "cdc", "clean_text": "text " * 60}) + "\n"
                       for i in range(n)).encode()
        name, run = "g.jsonl.gz", lambda f: guidelines(f, tmp_path / "o")
    else:
        data = "".join(json.dumps({"question": f"Which {i}?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}) + "\n"
                       for i in range(n)).encode()
        name, run = "medqa.jsonl.gz", lambda f: build_medqa(tmp_path / "o", src=f)
    f, sep, msg = _gz_variants(tmp_path, name, data)[case]
    with pytest.raises(UserError) as e:
        run(f)
    assert str(e.value).startswith(f"{f}{sep}") and msg in str(e.value), str(e.value)
    assert not (tmp_path / "o").exists()


def test_damaged_gz_cli_one_line(tmp_path, tools_cli):
    cases = _gz_variants(tmp_path, "NOTEEVENTS.csv.gz", _notes_csv_bytes())
    f, sep, msg = cases["truncated"]
    p = tools_cli("build-corpus", "mimic", "--csv", f, "--out", tmp_path / "o1", "--workers", "2")
    assert msg in one_error_line(p, f"error: {f}{sep}")
    f, sep, msg = cases["plain"]
    p = tools_cli("build-dataset", "qa", "--src", f, "--question-col", "TEXT", "--answer-col", "CATEGORY",
                  "--out", tmp_path / "o2")
    assert msg in one_error_line(p, f"error: {f}: ")


@pytest.mark.parametrize("size", [200_000, 3_000_000])
def test_large_csv_fields_are_read(tmp_path, size):
    """Fields over the csv module's default limit (128 KiB) are data, not errors."""
    from corpora.qa import build_qa

    big = "word " * (size // 5)
    f = write_csv(tmp_path / "qa.csv", ["question", "answer"], [["short q?", "a"], ["long q?", big]])
    art = build_qa(f, tmp_path / "o", question_col="question", answer_col="answer")
    assert art.extra["items"] == 2
    notes = write_csv(tmp_path / "n.csv", III_HEADER, [_iii_row(1, NOTE_III.format(big))])
    art = build_corpus(tmp_path / "m", csv_path=notes, workers=1, plot=False)
    assert len(corpus(art)[0]["text"]) > size * 0.9


def test_field_over_the_limit_names_file_and_line(tmp_path, monkeypatch, tools_cli):
    import tools.io

    monkeypatch.setattr(tools.io, "CSV_FIELD_LIMIT", 1000)
    f = write_csv(tmp_path / "qa.csv", ["question", "answer"], [["q1?", "a"], ["q2?", "b"], ["q3?", "x" * 5000]])
    from tools.io import read_csv
    with pytest.raises(UserError, match=r"qa\.csv:4: a field is larger than 1000 bytes"):
        list(read_csv(f))
    # an unterminated quote swallowing the rest of a file: the record's first line is named
    f.write_text('question,answer\nq1?,a\nq2?,"never closed\n' + "more text\n" * 500)
    with pytest.raises(UserError, match=r"qa\.csv:3: a field is larger than 1000 bytes"):
        list(read_csv(f))
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"qa\.csv:3: malformed CSV row \(unexpected end of data\)"):
        list(read_csv(f))
    f.write_text('question,answer\nq1?,a\nq2?,"closed" then text\n')
    with pytest.raises(UserError, match=r"qa\.csv:3: malformed CSV row"):
        list(read_csv(f))


def test_mimic_block_with_a_bad_row_and_a_huge_note_names_the_bad_row(tmp_path):
    """Arrow refuses the block, the strict reader takes over: a 300 KB note is no error, the short row is."""
    big = NOTE_III.format("word " * 60000)
    body = io.StringIO()
    w = csv.writer(body, lineterminator="\n")
    w.writerow(III_HEADER)
    w.writerow(_iii_row(1, big))
    body.write("2,2,,,,,Physician ,d,,\n")
    f = tmp_path / "n.csv"
    f.write_text(body.getvalue())
    with pytest.raises(UserError, match=r"n\.csv:5: row has 10 fields, header has 11"):
        build_corpus(tmp_path / "o", csv_path=f, workers=1, plot=False)


# -- line numbers past the first buffered chunk -----------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", ["jsonl", "csv"])
@pytest.mark.parametrize("bad_line", [1, 2, 700, 5000])
def test_bad_byte_line_is_exact(tmp_path, gz, kind, bad_line):
    from tools.io import read_csv, read_jsonl

    lines = []
    for i in range(1, 5001):
        if kind == "jsonl":
            lines.append(json.dumps({"id": i, "text": "é some text"}, ensure_ascii=False).encode() + b"\n")
        else:
            lines.append(b"id,text\n" if i == 1 else b'%d,"caf\xc3\xa9 text"\n' % i)
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"\xc3\xa9", b"\xe9") if b"\xc3\xa9" in lines[bad_line - 1] \
        else lines[bad_line - 1].replace(b"id", b"i\xffd")
    data = b"".join(lines)
    f = tmp_path / f"x.{kind}{'.gz' if gz else ''}"
    f.write_bytes(gzip.compress(data) if gz else data)
    reader = read_jsonl if kind == "jsonl" else read_csv
    with pytest.raises(UserError, match=rf"x\.{kind}(\.gz)?:{bad_line}: not UTF-8 \(byte 0x(e9|ff)\)"):
        list(reader(f))


def test_csv_multiline_records_keep_line_numbers(tmp_path):
    from tools.io import read_csv_numbered

    f = tmp_path / "m.csv"
    f.write_bytes(b'\xef\xbb\xbfq,a\n"one\ntwo",x\n\n"three",y\n"four\n\nfive",z\nlast,\xff\n')
    rows = []
    with pytest.raises(UserError, match=r"m\.csv:9: not UTF-8 \(byte 0xff\)"):
        for n, r in read_csv_numbered(f):
            rows.append((n, r))
    assert rows == [(2, {"q": "one\ntwo", "a": "x"}), (5, {"q": "three", "a": "y"}),
                    (6, {"q": "four\n\nfive", "a": "z"})], "BOM dropped; start lines of multi-line records"


# -- repeated JSON keys, upstream nulls -------------------------------------------------------------
@pytest.mark.parametrize("line,expect", [
    ('{"id": 1, "text": "a", "id": 2}', "repeated key 'id'"),
    ('{"id": 1, "meta": {"k": 1, "k": 1}}', "repeated key 'k'"),
    ('{"a": [{"x": 1}, {"y": 2, "y": 3}]}', "repeated key 'y'"),
])
def test_jsonl_repeated_key_refused(tmp_path, line, expect):
    from tools.io import read_jsonl

    f = tmp_path / "d.jsonl"
    f.write_text('{"id": 0}\n\n' + line + "\n")
    with pytest.raises(UserError, match=rf"d\.jsonl:3 \[\w+\]: {expect}"):
        list(read_jsonl(f))


def test_json_document_repeated_key_line(tmp_path):
    """A whole document (ori_pqal.json): the line of the second occurrence is named."""
    from corpora.sft import build_pubmedqa

    item = {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "yes", "LONG_ANSWER": "Because."}
    body = json.dumps(item)
    f = tmp_path / "ori_pqal.json"
    f.write_text('{\n"100": ' + body + ',\n"101": ' + body + ',\n"100": ' + body + "\n}\n")
    with pytest.raises(UserError, match=r"ori_pqal\.json:4: repeated key '100'"):
        build_pubmedqa(tmp_path / "o", src=f)
    f.write_text('{"100": ' + body + ',\n"101": {"QUESTION": "a",\n "QUESTION": "b"}}')
    with pytest.raises(UserError, match=r"ori_pqal\.json:3: repeated key 'QUESTION'"):
        build_pubmedqa(tmp_path / "o", src=f)
    assert not (tmp_path / "o").exists()


def test_upstream_nulls_never_become_none(tmp_path):
    from corpora.guidelines import build_corpus as guidelines
    from corpora.qa import build_qa
    from corpora.sft import build_medqa, build_pubmedqa

    f = tmp_path / "ori_pqal.json"
    f.write_text(json.dumps({"12345": {"QUESTION": "Does it work?", "CONTEXTS": ["Some context."], "final_decision": "yes",
                                       "LONG_ANSWER": "It does.", "YEAR": None, "MESHES": None}}))
    row = json.loads((build_pubmedqa(tmp_path / "p", src=f).path / "train.jsonl").read_text())
    assert row["meta"]["year"] == "" and row["meta"]["meshes"] == []
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"question": "Which drug?", "options": {"A": "x", "B": "y"}, "answer_idx": "B",
                             "meta_info": None}) + "\n")
    row = json.loads((build_medqa(tmp_path / "mq", src=m).path / "train.jsonl").read_text())
    assert row["meta"]["meta_info"] == ""
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "a", "q": "Q1?", "a": "A1", "kind": None}) + "\n"
                 + json.dumps({"id": "b", "q": "Q2?", "a": "A2", "kind": "None"}) + "\n")
    art = build_qa(q, tmp_path / "qa", question_col="q", answer_col="a", filters=["kind=None"], id_col="id")
    rows = [json.loads(x) for x in (art.path / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["qa-b"], "a null does not match the text 'None'"
    q.write_text(json.dumps({"id": None, "q": "Q1?", "a": "A1"}) + "\n")
    with pytest.raises(UserError, match=r"q\.jsonl:1 \[id\]: empty id"):
        build_qa(q, tmp_path / "qa2", question_col="q", answer_col="a", id_col="id")
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"id": "1", "source": None, "clean_text": "text " * 80}) + "\n")
    with pytest.raises(UserError, match=r"g\.jsonl:1 \[source\]: source must be a non-empty string"):
        guidelines(g, tmp_path / "g")


def test_mimic_nulls_from_postgres_are_empty():
    from collections import Counter

    from corpora.mimic import clean_note

    r = clean_note(7, None, None, NOTE_III.format("a note with null category and flag"), NoteOptions(min_chars=10),
                   Counter())
    assert r is not None and '"source": "mimic-iii/noteevents/none"' in r[1] and "None" not in r[1]


# -- a textbook that is one huge line ---------------------------------------------------------------
@pytest.mark.parametrize("doc_words", [7, 100, 512])
def test_one_line_textbook_is_cut_by_doc_words(tmp_path, doc_words):
    from corpora.textbooks import build_corpus as textbooks

    src = tmp_path / "books"
    src.mkdir()
    words = [f"w{i}é" for i in range(20000)]
    (src / "book.txt").write_text(" ".join(words))         # no newline at all
    art = textbooks(src, tmp_path / "o", doc_words=doc_words, min_chars=1)
    docs = corpus(art)
    sizes = [len(d["text"].split()) for d in docs]
    assert max(sizes) <= 2 * doc_words and len(docs) >= 20000 // (2 * doc_words)
    assert " ".join(" ".join(d["text"].split()) for d in docs) == " ".join(words), "nothing lost, order kept"


@pytest.mark.parametrize("text", ["abc déf ghi " * 50, "é" * 300, "x" * 301, "a\nbb cc\n" + "ü" * 40])
def test_long_lines_read_in_pieces(tmp_path, text):
    from corpora.textbooks import read_lines

    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    got = list(read_lines(f, piece=16))
    assert "".join(s for _, s in got) == text
    assert [n for n, _ in got] == sorted(n for n, _ in got) and got[-1][0] == text.count("\n") + (not text.endswith("\n"))
    assert all(len(s.encode()) <= 32 for _, s in got)


# -- an existing path as --out ----------------------------------------------------------------------
def _qa_src(tmp_path: Path) -> Path:
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"q": "Q?", "a": "A"}) + "\n")
    return f


@pytest.mark.parametrize("kind", ["file", "folder-with-files", "symlink-to-file"])
def test_existing_user_path_as_out_is_refused_untouched(tmp_path, kind):
    from corpora.qa import build_qa

    src = _qa_src(tmp_path)
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("my notes")
    elif kind == "folder-with-files":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    else:
        (tmp_path / "target.txt").write_text("mine")
        out.symlink_to(tmp_path / "target.txt")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=r"out \[--out\]: .*refusing to replace it"):
        build_qa(src, out, question_col="q", answer_col="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing moved aside, nothing left behind"
    if kind == "file":
        assert out.read_text() == "my notes"
    elif kind == "folder-with-files":
        assert (out / "thesis.tex").read_text() == "precious"
    else:
        assert out.is_symlink() and (tmp_path / "target.txt").read_text() == "mine"


def test_existing_artifact_or_empty_folder_as_out_is_replaced(tmp_path, tools_cli):
    from corpora.qa import build_qa

    src = _qa_src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    a = build_qa(src, out, question_col="q", answer_col="a")
    b = build_qa(src, out, question_col="q", answer_col="a", force=True)
    assert a.path == b.path == out and (out / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no .old / .partial left"
    f = tmp_path / "file-out"
    f.write_text("keep me")
    p = tools_cli("build-dataset", "qa", "--src", src, "--question-col", "q", "--answer-col", "a", "--out", f)
    one_error_line(p, f"error: {f} [--out]: exists and is not an artifact folder")
    assert f.read_text() == "keep me"


# -- PubMedQA and MedQA as published upstream -------------------------------------------------------
PQ = {"QUESTION": "Is aspirin effective?", "CONTEXTS": ["Trial one.", "Trial two."], "LABELS": ["BACKGROUND", "RESULTS"],
      "MESHES": ["Aspirin"], "YEAR": "2001", "reasoning_required_pred": "yes", "reasoning_free_pred": "yes",
      "final_decision": "yes", "LONG_ANSWER": "Aspirin helps."}


def _pubmedqa_files(tmp_path: Path) -> dict[str, Path]:
    items = {"1001": PQ, "1002": {**PQ, "QUESTION": "Is it harmful?", "final_decision": "no"}}
    out = {}
    out["ori_pqal.json"] = tmp_path / "ori_pqal.json"
    out["ori_pqal.json"].write_text(json.dumps(items))
    out["test_set.json"] = tmp_path / "test_set.json"
    out["test_set.json"].write_text(json.dumps(items, indent=2))
    hf = [{"pubid": int(k), "question": v["QUESTION"],
           "context": {"contexts": v["CONTEXTS"], "labels": v["LABELS"], "meshes": v["MESHES"],
                       "reasoning_required_pred": ["yes"], "reasoning_free_pred": ["yes"]},
           "long_answer": v["LONG_ANSWER"], "final_decision": v["final_decision"]} for k, v in items.items()]
    out["pqa_labeled.jsonl"] = tmp_path / "pqa_labeled.jsonl"
    out["pqa_labeled.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in hf))
    out["pqa_labeled.json"] = tmp_path / "pqa_labeled.json"          # datasets' to_json: JSON Lines
    out["pqa_labeled.json"].write_text("".join(json.dumps(r) + "\n" for r in hf))
    import pyarrow as pa
    import pyarrow.parquet as pq
    out["pqa_labeled.parquet"] = tmp_path / "pqa_labeled.parquet"
    pq.write_table(pa.Table.from_pylist(hf), out["pqa_labeled.parquet"])
    return out


@pytest.mark.parametrize("name", ["ori_pqal.json", "test_set.json", "pqa_labeled.jsonl", "pqa_labeled.json",
                                  "pqa_labeled.parquet"])
def test_pubmedqa_upstream_formats(tmp_path, name):
    from corpora.sft import build_pubmedqa
    from evals.items import load_items

    f = _pubmedqa_files(tmp_path)[name]
    items, _ = load_items("pubmedqa", f)
    ctx = "Trial one.\nTrial two."
    assert [(i.id, i.question, i.context, i.answer) for i in items] == [
        ("1001", "Is aspirin effective?", ctx, "yes"), ("1002", "Is it harmful?", ctx, "no")]
    art = build_pubmedqa(tmp_path / "ds", src=f)
    rows = [json.loads(x) for x in (art.path / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["pubmedqa-1001", "pubmedqa-1002"]
    assert rows[0]["messages"][2]["content"] == "yes. Aspirin helps." and rows[0]["meta"]["meshes"] == ["Aspirin"]


def _medqa_files(tmp_path: Path) -> dict[str, Path]:
    q1 = {"question": "A 30-year-old man has fever. Which drug?", "answer": "Drug B",
          "options": {"A": "Drug A", "B": "Drug B", "C": "Drug C", "D": "Drug D"}, "meta_info": "step1", "answer_idx": "B"}
    q2 = {**q1, "question": "A 40-year-old woman has a cough. Which test?", "answer": "Test D", "answer_idx": "D",
          "options": {"A": "Test A", "B": "Test B", "C": "Test C", "D": "Test D"}}
    own = [q1, q2]
    out = {"medqa.jsonl": tmp_path / "phrases_no_exclude_train.jsonl"}
    out["medqa.jsonl"].write_text("".join(json.dumps({**q, "metamap_phrases": ["x"]}) + "\n" for q in own))
    src = [{**q, "options": [{"key": k, "value": v} for k, v in q["options"].items()]} for q in own]
    out["bigbio_source.jsonl"] = tmp_path / "med_qa_en_source.jsonl"
    out["bigbio_source.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in src))
    qa = [{"id": f"q{i}", "question_id": f"q{i}", "document_id": f"d{i}", "question": q["question"],
           "type": "multiple_choice", "choices": list(q["options"].values()), "context": "", "answer": [q["answer"]]}
          for i, q in enumerate(own)]
    out["bigbio_qa.jsonl"] = tmp_path / "med_qa_en_bigbio_qa.jsonl"
    out["bigbio_qa.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in qa))
    import pyarrow as pa
    import pyarrow.parquet as pq
    out["bigbio_source.parquet"] = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(src), out["bigbio_source.parquet"])
    return out


@pytest.mark.parametrize("name", ["medqa.jsonl", "bigbio_source.jsonl", "bigbio_qa.jsonl", "bigbio_source.parquet"])
def test_medqa_upstream_formats(tmp_path, name):
    from corpora.sft import build_medqa
    from evals.items import load_items

    f = _medqa_files(tmp_path)[name]
    items, _ = load_items("medqa", f)
    assert [(i.answer, i.options["D"]) for i in items] == [("B", "Drug D"), ("D", "Test D")]
    art = build_medqa(tmp_path / "ds", src=f)
    rows = [json.loads(x) for x in (art.path / "train.jsonl").read_text().splitlines()]
    assert [r["messages"][2]["content"] for r in rows] == ["(B) Drug B", "(D) Test D"]
    # ids carry the source (split) file: BigBio numbers every split from 0, so bare ids would collide
    own = ["1", "2"] if name != "bigbio_qa.jsonl" else ["q0", "q1"]   # line numbers where rows have no id
    assert [r["id"] for r in rows] == [f"medqa-{f.stem}-{i}" for i in own]


@pytest.mark.parametrize("record,msg", [
    ({"question": "Q?", "options": [{"key": "A", "value": "x"}, {"key": "A", "value": "y"}], "answer_idx": "A"},
     r"\[options\]: option 'A' given twice"),
    ({"question": "Q?", "options": [{"key": "A"}, {"key": "B", "value": "y"}], "answer_idx": "A"},
     r"\[options\]: options must be a list of \{key, value\} texts"),
    ({"id": "x", "question": "Q?", "choices": ["a", "b"], "answer": ["c"]}, r"\[answer\]: answer 'c' is not exactly one"),
    ({"question": "Q?", "opts": {"A": "x"}}, r"\[record\]: not a MedQA record"),
])
def test_medqa_upstream_bad_records(tmp_path, record, msg):
    from corpora.sft import build_medqa
    from evals.items import load_items

    f = tmp_path / "bad.jsonl"
    f.write_text("\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2 " + msg):
        build_medqa(tmp_path / "o", src=f)
    if "record" not in msg:
        with pytest.raises(UserError, match=r"bad\.jsonl:2 " + msg):
            load_items("medqa", f)


def test_pubmedqa_bad_upstream_records_named(tmp_path):
    from evals.items import load_items

    f = tmp_path / "test_set.json"
    f.write_text(json.dumps({"1": PQ, "2": {**PQ, "final_decision": "perhaps"}}))
    with pytest.raises(UserError, match=r"test_set\.json \[2\.final_decision\]: final_decision 'perhaps'"):
        load_items("pubmedqa", f)
    f.write_text(json.dumps({"1": PQ, "2": {**PQ, "CONTEXTS": [None]}}))
    with pytest.raises(UserError, match=r"test_set\.json \[2\.CONTEXTS\]"):
        load_items("pubmedqa", f)


# -- no network at run time -------------------------------------------------------------------------
def test_convert_and_inspect_offline(tiny_llama, tmp_path, tools_cli):
    """No package index, an unroutable proxy, empty caches: llama.cpp's converter comes from the venv."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"PIP_NO_INDEX": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": "",
           "MEDILORA_CACHE": str(cache / "medilora"), "XDG_CACHE_HOME": str(cache), "LLAMA_CPP_DIR": "",
           "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "gguf"
    p = tools_cli("convert", tiny_llama, "--outtype", "f16", "--out", out, "--fidelity-tokens", "0", "--json",
                  env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ggufs = list(out.glob("*.gguf"))
    assert len(ggufs) == 1 and ggufs[0].read_bytes()[:4] == b"GGUF"
    p = tools_cli("inspect", ggufs[0], "--json", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout)["results"]
    assert info["architecture"] == "llama"
    assert not any(cache.rglob("*")), "nothing downloaded or cached at run time"
