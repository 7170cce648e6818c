"""`tools train STAGE --select-by TASK[:N]`: keep the checkpoint with the best dev accuracy.

Every whole checkpoint a training saved is scored on dev items by log-likelihood, with the prompts
of `tools bench --mode loglik` (evals.items: the same system prompt, user message and answer
continuation; the chat template of the checkpoint's tokenizer, which `tools convert` puts into the
GGUF) and lm-eval's tokenization of the continuation (the whole text encoded, cut at the context).
The model is the checkpoint itself through transformers + peft (no merge or GGUF per checkpoint),
so a step costs one forward pass per item plus one per multi-token option. The chosen checkpoint
has the highest accuracy; ties go to the earliest step (the least trained of the equals).

Where it lives: the scoring is evaluation (this module); `recipes.selection` is the training side
(keep every checkpoint, hand them over, put the chosen one into ``output/``). recipes cannot import
evals (layers), so evals.cli registers :func:`selector` there when the CLI starts.

TASK: ``pubmedqa-dev``, ``medqa-dev`` (the bundled dev splits) or a JSONL file in `tools bench mcq`'s
form; ``:N`` takes the first N items the stage does not train on (an item whose question appears in
a user turn of the stage's training files is left out, and counted). Test items are refused as
everywhere: a ``-test`` task, and a file holding any PubMedQA test PMID or MedQA test question (exit 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from corpora.sft import medqa_test_questions, norm_question, pubmedqa_test_ids
from tools.errors import UserError
from tools.io import read_jsonl, sha256_bytes, sha256_file, write_jsonl
from tools.progress import log, progress

from .bench import PROMPT_FORMAT
from .items import Item, answer_text, default_data, load_items, system_prompt, user_message
from .mcq import load_mcq
from .stats import wilson

TIE_RULE = "highest accuracy; ties: the earliest step"


@dataclass(frozen=True)
class SelectBy:
    """A parsed ``--select-by``: which items, read from where."""

    spec: str           # as given
    flavor: str         # pubmedqa | medqa (how items are asked)
    split: str          # dev | custom
    data: Path
    limit: int | None

    field: str = "--select-by"  # the option it came from, for errors

    def load(self, trained: frozenset[str] = frozenset()) -> tuple[list[Item], int]:
        """(the first N items whose question the stage does not train on, how many were left out)."""
        if self.split == "custom":
            items = load_mcq(self.data, None)[0]
        else:
            items = load_items(self.flavor, self.data, self.split)[0]
        refuse_test_items(items, self.flavor, self.data, field=self.field)
        kept = [it for it in items if not _trained_on(it, trained)]
        if not kept:
            raise UserError(f"all {len(items)} items are in the stage's training data: hold some out (tools split) "
                            "or choose on other items", path=str(self.data), field=self.field)
        return kept[:self.limit] if self.limit else kept, len(items) - len(kept)


def _norm(text: str) -> str:
    return norm_question(text)


def _trained_on(item: Item, trained: frozenset[str]) -> bool:
    q = _norm(item.question)
    return bool(q) and any(q in t for t in trained)


def trained_prompts(files: list[str | Path]) -> frozenset[str]:
    """The user turns of a stage's ChatML training files, normalized (items asked there are left
    out of the selection: a checkpoint is not chosen on what it was trained on)."""
    out = set()
    for f in files:
        if not Path(f).is_file() or not str(f).endswith(".jsonl"):
            continue
        for row in read_jsonl(f):
            for m in row.get("messages") or [] if isinstance(row, dict) else []:
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                    out.add(_norm(m["content"]))
    return frozenset(out)


def parse_select_by(spec: str, field: str = "--select-by") -> SelectBy:
    """``pubmedqa-dev[:N]``, ``medqa-dev[:N]`` or ``FILE.jsonl[:N]``; test items are refused (UserError naming
    ``field``, the option the spec came from: ``--select-by``, `tools quantize`'s ``--budget-data``)."""
    text = (spec or "").strip()
    head, _, n = text.rpartition(":") if ":" in text else (text, "", "")
    if not head:
        head, n = text, ""
    limit = None
    if n:
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"{spec!r}: N after ':' must be a positive number", field=field)
        limit = int(n)
    task, _, split = head.partition("-")
    if task in ("pubmedqa", "medqa") and split:
        if split != "dev":
            raise UserError(f"{spec!r}: choices are made on the dev split, never on {split} "
                            "(test items judge the final model only)", field=field)
        return SelectBy(text, task, "dev", default_data(task, "dev"), limit, field)
    path = Path(head)
    if path.suffix == ".jsonl" and path.is_file():
        flavor = load_mcq(path, None, 1)[2]
        return SelectBy(text, flavor, "custom", path, limit, field)
    raise UserError(f"{spec!r} is neither pubmedqa-dev[:N], medqa-dev[:N] nor an existing .jsonl file", field=field)


def refuse_test_items(items: list[Item], flavor: str, path: Path, field: str = "--select-by") -> None:
    """Refuse any PubMedQA test PMID or MedQA test question (corpora.sft holds both lists)."""
    test_ids = pubmedqa_test_ids() if flavor == "pubmedqa" else frozenset()
    test_q = medqa_test_questions()
    for it in items:
        if it.id in test_ids or norm_question(it.question) in test_q:
            raise UserError(f"item {it.id!r} is a benchmark test item: choices are made on dev or train items "
                            "only", path=str(path), field=field)


# ---- the scorer --------------------------------------------------------------------------------

def load_checkpoint(base_model: str, ckpt: Path):
    """(model, tokenizer) of a checkpoint: a LoRA adapter on ``base_model`` or a full model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = (ckpt / "adapter_config.json").is_file()
    tok_dir = ckpt if (ckpt / "tokenizer_config.json").is_file() else Path(base_model)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_model if adapter else ckpt), torch_dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        if model.get_input_embeddings().weight.shape[0] != len(tok):
            model.resize_token_embeddings(len(tok))  # ChatML tokens added in training (lora_modules_to_save)
        model = PeftModel.from_pretrained(model, str(ckpt))
    return model.eval(), tok


def chat_prompt(tok, flavor: str, item: Item) -> str:
    """The bench's zero-shot prompt of ``item`` through the tokenizer's chat template (BOS left to the
    tokenizer, as llama.cpp adds it when tokenizing)."""
    msgs = [{"role": "system", "content": system_prompt(flavor, item.options)},
            {"role": "user", "content": user_message(flavor, item)}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok(bos, add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos):]
    return text


def option_logliks(model, tok, prompt: str, conts: list[str]) -> tuple[list[float], int]:
    """(sum log p(continuation | prompt) per continuation, prompt tokens): one pass over the prompt,
    then each continuation on a cache cropped back to the prompt."""
    import torch

    ctx = tok(prompt, add_special_tokens=True)["input_ids"]
    pieces = []
    for c in conts:
        whole = tok(prompt + c, add_special_tokens=True)["input_ids"]
        ok = whole[:len(ctx)] == ctx and len(whole) > len(ctx)
        pieces.append(whole[len(ctx):] if ok else tok(c, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ctx]), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        cache = out.past_key_values
        scores = []
        for cont in pieces:
            lp = float(first[cont[0]])
            if len(cont) > 1:
                o = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=cache, use_cache=True)
                ls = torch.log_softmax(o.logits[0].float(), -1)
                lp += float(sum(ls[j, cont[j + 1]] for j in range(len(cont) - 1)))
                cache.crop(len(ctx))
            scores.append(lp)
    return scores, len(ctx)


def score_checkpoint(base_model: str, ckpt: Path, items: list[Item], flavor: str) -> list[dict]:
    """One row an item, as bench's items.jsonl in loglik mode: id, gold, loglik, pred, correct,
    prompt_sha256 (the argmax keeps the first option on ties, as bench does)."""
    model, tok = load_checkpoint(base_model, ckpt)
    rows = []
    for it in items:
        opts = list(it.options)
        prompt = chat_prompt(tok, flavor, it)
        lls, n_prompt = option_logliks(model, tok, prompt, [answer_text(flavor, lab, it) for lab in opts])
        ll = {lab: round(s, 6) for lab, s in zip(opts, lls)}
        pred = max(opts, key=lambda lab: (ll[lab], -opts.index(lab)))
        rows.append({"id": it.id, "gold": it.answer, "loglik": ll, "pred": pred, "correct": pred == it.answer,
                     "prompt_sha256": sha256_bytes(prompt), "prompt_tokens": n_prompt})
    return rows


def choose(scored: list[dict]) -> dict:
    """The checkpoint with the highest accuracy, the earliest on ties."""
    return max(scored, key=lambda s: (s["correct"], -s["step"]))


def select_checkpoint(sel: SelectBy, checkpoints: list[tuple[int, Path]], base_model: str,
                      rows_out: Path | None = None, train_files: tuple = ()) -> dict:
    """Score every checkpoint on ``sel``'s items (less those asked in ``train_files``) and choose one;
    returns the manifest record (``checkpoints``: step, accuracy, accuracy_ci95, correct, n;
    ``chosen_step``). With ``rows_out``, every (checkpoint, item) row is written there as JSONL."""
    if not checkpoints:
        raise UserError("--select-by: the training saved no whole checkpoint to choose from", field="--select-by")
    items, left_out = sel.load(trained_prompts(list(train_files)))
    if left_out:
        log(f"select-by {sel.spec}: {left_out} items left out (the stage trains on them)")
    scored, all_rows = [], []
    with progress(f"select-by {sel.spec}", total=len(checkpoints), unit="checkpoints") as advance:
        for step, ckpt in sorted(checkpoints):
            rows = score_checkpoint(base_model, ckpt, items, sel.flavor)
            k = sum(r["correct"] for r in rows)
            scored.append({"step": step, "checkpoint": ckpt.name, "correct": k, "n": len(rows),
                           "accuracy": round(k / len(rows), 6), "accuracy_ci95": wilson(k, len(rows))})
            all_rows += [{"step": step, **r} for r in rows]
            log(f"select-by {sel.spec}: step {step} accuracy {k}/{len(rows)} = {k / len(rows):.3f}")
            advance(1)
    best = choose(scored)
    if rows_out is not None:
        write_jsonl(rows_out, all_rows)
    log(f"select-by {sel.spec}: chose step {best['step']} (accuracy {best['accuracy']:.3f} "
        f"{best['accuracy_ci95']}; last step {scored[-1]['step']}: {scored[-1]['accuracy']:.3f})")
    return {"by": sel.spec, "task": sel.flavor, "split": sel.split, "n": len(items), "scorer": "hf-loglik",
            "prompt_format": PROMPT_FORMAT, "data": {"path": str(sel.data.resolve()), "sha256": sha256_file(sel.data)},
            "rule": TIE_RULE, "left_out_trained": left_out, "checkpoints": scored, "chosen_step": best["step"],
            "last_step": scored[-1]["step"]}


def selector(spec: str):
    """The callable `tools train --select-by SPEC` hands the checkpoints to (parsed and test-checked
    now, before any training): ``fn(checkpoints, base_model, rows_out, train_files) -> record``."""
    sel = parse_select_by(spec)
    sel.load()  # refuse test items (and unreadable files) before training starts

    def fn(checkpoints: list[tuple[int, Path]], base_model: str, rows_out: Path | None = None,
           train_files: tuple = ()) -> dict:
        return select_checkpoint(sel, checkpoints, base_model, rows_out, train_files)

    def check(train_files: tuple) -> int:
        """Before training: items are left after those the stage trains on (UserError if none); how many."""
        return len(sel.load(trained_prompts(list(train_files)))[0])
    fn.spec = sel.spec  # type: ignore[attr-defined]
    fn.check = check  # type: ignore[attr-defined]
    return fn
