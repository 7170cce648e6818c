"""Datasets for the local lm-eval tasks, read from the data MediLoRA ships (no Hub).

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; these return a DatasetDict.
"""
from __future__ import annotations

import csv
from pathlib import Path

from evals.items import load_items, system_prompt, user_message
from tools.errors import UserError
from tools.io import require_file
from tools.paths import bundled_data

SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "high_school_biology",
            "medical_genetics", "nutrition", "professional_medicine", "virology")


def mmlu_csv(path: Path, subject: str) -> list[dict]:
    """Rows of an MMLU CSV (no header: question, A, B, C, D, answer letter); bad rows name file:line."""
    require_file(path, "MMLU CSV")
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != 6:
                    raise UserError(f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}",
                                    path=str(path), line=reader.line_num)
                if row[5].strip() not in "ABCD" or not row[5].strip():
                    raise UserError(f"answer {row[5]!r} is not A-D", path=str(path), line=reader.line_num,
                                    field="answer")
                docs.append({"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5].strip()),
                             "subject": subject})
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 (byte 0x{e.object[e.start]:02x})", path=str(path),
                            line=reader.line_num + 1) from None
    if not docs:
        raise UserError("no rows", path=str(path))
    return docs


def load_mmlu(subject: str, data_dir: str | None = None, **_):
    import datasets

    root = Path(data_dir) if data_dir else bundled_data() / "mmlu_medical"
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(mmlu_csv(root / split / f"{subject}_{split}.csv", subject))
        for split in ("test", "dev")})


def load_pubmedqa(data: str | None = None, split: str = "test", **_):
    """PubMedQA items with the bench's exact ChatML prompt (field ``prompt``) and options."""
    import datasets
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tools.llm import CHATML

    items, _path = load_items("pubmedqa", data, split)
    fmt = Jinja2ChatFormatter(template=CHATML, eos_token="<|im_end|>", bos_token="", add_generation_prompt=True)
    docs = []
    for it in items:
        msgs = [{"role": "system", "content": system_prompt("pubmedqa")},
                {"role": "user", "content": user_message("pubmedqa", it)}]
        labels = list(it.options)
        docs.append({"id": it.id, "prompt": fmt(messages=msgs).prompt, "choices": labels,
                     "label": labels.index(it.answer)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
