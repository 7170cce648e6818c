"""An error line quotes at most a short, cut excerpt of the input: a huge one-line CSV header given to
`build-dataset qa` is refused in one line of a few hundred characters, not repeated whole."""
from __future__ import annotations

from tools.errors import EXCERPT_CHARS, MESSAGE_CHARS, UserError, excerpt


def test_excerpt_cuts_and_says_how_long():
    assert excerpt("a  b\n c") == "a b c"
    long = "x" * 10_000_000
    e = excerpt(long)
    assert e.startswith("x" * EXCERPT_CHARS + "...") and "10,000,000 characters" in e and len(e) < 150
    msg = str(UserError("bad value " + long, path="f.csv", line=1, field="q"))
    assert msg.startswith("f.csv:1 [q]: bad value xxx") and len(msg) < MESSAGE_CHARS + 100


def test_huge_one_line_csv_header_is_not_repeated(tools_cli, tmp_path):
    src = tmp_path / "wide.csv"
    header = ",".join(f"column_{i:07d}" for i in range(600_000))  # 8.4 MB, one line, no 'q' column
    src.write_text(header + "\n", encoding="utf-8")
    p = tools_cli("build-dataset", "qa", "--src", src, "--question-col", "q", "--answer-col", "a",
                  "--out", tmp_path / "o")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}:1 [q]: missing column 'q'"), lines[0][:300]
    assert "column_0000000, column_0000001" in lines[0] and "characters]" in lines[0]
    assert len(lines[0]) < 600 and len(p.stderr) < 1000
    assert not (tmp_path / "o").exists()
