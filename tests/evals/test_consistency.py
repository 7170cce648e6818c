"""Train as you test: the SFT sets carry exactly the system prompt and user message that the bench
asks the model (the MediLoRA protocol), for PubMedQA and MedQA."""
from __future__ import annotations

import json

from tools.paths import bundled_data


def test_sft_messages_equal_bench_prompts(tmp_path):
    from corpora.sft import build_medqa, build_pubmedqa
    from evals.items import load_items, system_prompt, user_message

    for task, build in (("pubmedqa", build_pubmedqa), ("medqa", build_medqa)):
        art = build(tmp_path / task)
        rows = [json.loads(x) for x in (art.path / "train.jsonl").read_text().splitlines()[:20]]
        items = {it.id: it for it in load_items(task, bundled_data() / task / "dev.jsonl")[0]}
        checked = 0
        for row in rows:
            sys_m, user_m, asst_m = row["messages"]
            key = str(row["id"]).rsplit("-", 1)[-1] if task == "medqa" else str(row["id"])
            it = items.get(key) or items.get(str(row["meta"].get("line", ""))) or items.get(str(row["meta"].get("pmid", "")))
            if it is None:
                continue
            assert sys_m["content"] == system_prompt(task, it.options)
            assert user_m["content"] == user_message(task, it)
            if task == "pubmedqa":
                assert asst_m["content"].split(".", 1)[0] == it.answer
            else:
                assert asst_m["content"].startswith(f"({it.answer}) ")
            checked += 1
        assert checked >= 10, f"{task}: only {checked} SFT rows matched bench items"
