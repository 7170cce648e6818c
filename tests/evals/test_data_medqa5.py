"""evals/data/medqa5: the files SOURCE.md describes (sha256), the same questions and answers as medqa/."""
from __future__ import annotations

import json
import re

from tools.io import sha256_file
from tools.paths import bundled_data


def test_medqa5_matches_its_source_and_the_4_option_files():
    root = bundled_data()
    source = (root / "medqa5" / "SOURCE.md").read_text()
    for split in ("test", "dev"):
        f = root / "medqa5" / f"{split}.jsonl"
        listed = re.search(rf"`{split}\.jsonl` = .*?sha256 ([0-9a-f]{{64}})", source, re.S).group(1)
        assert sha256_file(f) == listed
        five = [json.loads(x) for x in f.read_text().splitlines()]
        four = [json.loads(x) for x in (root / "medqa" / f"{split}.jsonl").read_text().splitlines()]
        assert len(five) == len(four) and all(len(r["options"]) == 5 for r in five)
        assert all(a["question"] == b["question"] and a["answer"] == b["answer"] == a["options"][a["answer_idx"]]
                   for a, b in zip(five, four))
