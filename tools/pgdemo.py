"""Run a command with a throw-away PostgreSQL holding a MIMIC-shaped NOTEEVENTS table (make demo).

    python -m tools.pgdemo --csv NOTEEVENTS.csv -- tools run recipes/pipelines/demo.yaml ...

When PostgreSQL's server binaries are installed, a cluster is started on a free 127.0.0.1 port,
``mimiciii.noteevents`` (the official schema's columns) is loaded from the CSV, the DSN is put in
``$MEDILORA_MIMIC_DSN`` and ``--var notes=`` is appended so the pipeline reads the notes from the
database; the server is stopped afterwards. Without a server the command runs unchanged (the CSV
path).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .pgserver import PgServer, find_bindir

DDL = """CREATE TABLE mimiciii.noteevents (
    ROW_ID INT NOT NULL, SUBJECT_ID INT NOT NULL, HADM_ID INT, CHARTDATE TIMESTAMP(0),
    CHARTTIME TIMESTAMP(0), STORETIME TIMESTAMP(0), CATEGORY VARCHAR(50), DESCRIPTION VARCHAR(255),
    CGID INT, ISERROR CHAR(1), TEXT TEXT, CONSTRAINT noteevents_rowid_pk PRIMARY KEY (ROW_ID))"""


def load_noteevents(server: PgServer, csv_path: str) -> str:
    import psycopg

    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE mimic")
    with psycopg.connect(server.dsn("mimic")) as conn:
        conn.execute("CREATE SCHEMA mimiciii")
        conn.execute(DDL)
        with conn.cursor() as cur, open(csv_path, "rb") as f:
            with cur.copy("COPY mimiciii.noteevents FROM STDIN WITH (FORMAT csv, HEADER true, NULL '')") as cp:
                while chunk := f.read(1 << 20):
                    cp.write(chunk)
    return server.dsn("mimic")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pgdemo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", required=True)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if find_bindir() is None:
        print("pgdemo: no PostgreSQL server installed: the demo reads the notes from the CSV", file=sys.stderr)
        return subprocess.call(cmd)
    with PgServer() as server:
        dsn = load_noteevents(server, a.csv)
        print(f"pgdemo: NOTEEVENTS loaded into a throw-away PostgreSQL ({dsn})", file=sys.stderr)
        env = dict(os.environ, MEDILORA_MIMIC_DSN=dsn)
        return subprocess.call(cmd + ["--var", "notes="], env=env)


if __name__ == "__main__":
    sys.exit(main())
