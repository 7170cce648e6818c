"""CLI verbs of the corpora package: build-corpus mimic|textbooks|guidelines,
build-dataset pubmedqa|medqa|qa, split, decontaminate."""
from __future__ import annotations

import click

from tools.cli_options import artifact_options, emit_json
from tools.errors import UserError
from tools.progress import log


def _multi(values) -> tuple[str, ...]:
    """Repeatable options that also accept comma-separated lists."""
    out = []
    for v in values or ():
        out.extend(x for x in v.split(",") if x.strip())
    return tuple(out)


def _report(art, as_json: bool, summary: str) -> None:
    from tools.progress import out

    if as_json:
        return emit_json(art)
    out.print(f"{art.stage}: {summary} -> {art.path}", markup=False)


_common = artifact_options("Output artifact folder.", out_required=True)


def _canary_options(f):
    """--canaries N [--canary-seed S --canary-repeats R] on every build-corpus verb (corpora/canaries.py)."""
    f = click.option("--canary-repeats", default=1, show_default=True, type=click.IntRange(1),
                     help="Documents each canary is planted in.")(f)
    f = click.option("--canary-seed", default=0, show_default=True, type=int, help="Seed of the canaries.")(f)
    return click.option("--canaries", default=0, show_default=True, type=click.IntRange(0),
                        help="Plant N random MRN-shaped secrets (recorded only in this manifest) for `tools audit`.")(f)


def _spec(canaries: int, seed: int, repeats: int):
    from .canaries import CanarySpec

    return CanarySpec(canaries, seed, repeats) if canaries else None


@click.command("mimic")
@click.option("--csv", "csv_path", type=click.Path(),
              help="NOTEEVENTS.csv[.gz] (MIMIC-III) or discharge/radiology.csv[.gz] (MIMIC-IV-Note), instead of --dsn.")
@click.option("--dsn", envvar="MEDILORA_MIMIC_DSN", help="PostgreSQL DSN (or $MEDILORA_MIMIC_DSN).")
@click.option("--schema", default=None,
              help="Schema (default: mimiciii, then mimiciv_note). Unquoted names fold to lower case, as in SQL.")
@click.option("--table", default=None, help="Table (default: noteevents, then discharge).")
@click.option("--version", "mimic_version", type=click.Choice(["auto", "iii", "iv"]), default="auto",
              show_default=True, help="MIMIC-III NOTEEVENTS or MIMIC-IV-Note (auto: from the columns).")
@click.option("--category", "categories", multiple=True,
              help="Keep these note categories (MIMIC-IV: note types DS, RR... or discharge, radiology; "
                   "repeat or comma-separate; trailing spaces ignored). Default: all.")
@click.option("--keep-errors", is_flag=True, help="Keep notes flagged ISERROR = '1'.")
@click.option("--sections-file", type=click.Path(), help="YAML: keep: [section names], headers: {...}.")
@click.option("--all-sections", is_flag=True, help="Keep whole notes (no section filter).")
@click.option("--placeholder", default="", help="Replacement for [** ... **] placeholders (default: remove).")
@click.option("--min-chars", default=200, show_default=True, type=click.IntRange(0))
@click.option("--no-dedup", is_flag=True, help="Keep exact duplicates.")
@click.option("--refuse-duplicate-ids", is_flag=True,
              help="Stop on two notes with one id (default: keep the first, count the others in the manifest).")
@click.option("--workers", type=click.IntRange(1), help="Worker processes (default: all cores).")
@_canary_options
@_common
def mimic(csv_path, dsn, schema, table, mimic_version, categories, keep_errors, sections_file, all_sections,
          placeholder, min_chars, no_dedup, refuse_duplicate_ids, workers, canaries, canary_seed, canary_repeats,
          out, force, as_json):
    """MIMIC-III NOTEEVENTS or MIMIC-IV-Note -> completion corpus (credentialed lineage).

    \b
    Example:
      tools build-corpus mimic --dsn "host=db dbname=mimic user=me" --category "Discharge summary" --out runs/mimic
      tools build-corpus mimic --csv NOTEEVENTS.csv.gz --out runs/mimic
      tools build-corpus mimic --csv note/discharge.csv.gz --out runs/mimic-iv
      tools build-corpus mimic --csv NOTEEVENTS.csv.gz --canaries 10 --out runs/mimic   # for `tools audit`
      tools build-corpus mimic --dsn "host=db dbname=mimiciv user=me" --schema mimiciv_note --table radiology --out runs/rad
    """
    from .mimic import build_corpus, note_options

    if csv_path and dsn and click.get_current_context().get_parameter_source("dsn") == \
            click.core.ParameterSource.ENVIRONMENT:
        dsn = None  # $MEDILORA_MIMIC_DSN is a default, --csv an explicit choice
    opts = note_options(categories=_multi(categories), keep_errors=keep_errors, sections_file=sections_file,
                        all_sections=all_sections, placeholder=placeholder, min_chars=min_chars)
    art = build_corpus(out, csv_path=csv_path, dsn=dsn, schema=schema, table=table, version=mimic_version,
                       opts=opts, workers=workers, dedup=not no_dedup, refuse_duplicate_ids=refuse_duplicate_ids,
                       canaries=_spec(canaries, canary_seed, canary_repeats), force=force, log=log)
    s = art.extra.get("stats", {})
    _report(art, as_json, f"{s.get('kept', 0):,} notes kept of {s.get('rows', 0):,} read")


@click.command("textbooks")
@click.option("--src", required=True, type=click.Path(), help="Folder of .txt files.")
@click.option("--doc-words", default=512, show_default=True, type=click.IntRange(1), help="Words per document.")
@click.option("--min-tokens", default=5, show_default=True, type=click.IntRange(1),
              help="Lines with fewer tokens are joined to the next line.")
@click.option("--min-chars", default=50, show_default=True, type=click.IntRange(0))
@click.option("--license", "license_", default=None, help="License of the texts (recorded in the lineage).")
@_canary_options
@_common
def textbooks(src, doc_words, min_tokens, min_chars, license_, canaries, canary_seed, canary_repeats, out, force,
              as_json):
    """USMLE textbook .txt files -> completion corpus.

    \b
    Example:
      tools build-corpus textbooks --src data/textbooks/en --out runs/textbooks
    """
    from .textbooks import DEFAULT_LICENSE, build_corpus

    art = build_corpus(src, out, min_tokens=min_tokens, doc_words=doc_words, min_chars=min_chars,
                       license=license_ or DEFAULT_LICENSE, canaries=_spec(canaries, canary_seed, canary_repeats),
                       force=force)
    _report(art, as_json, f"{art.extra['stats']['documents']:,} documents")


@click.command("guidelines")
@click.option("--src", required=True, type=click.Path(), help="Meditron guidelines JSONL.")
@click.option("--source", "sources", multiple=True, help="Keep these sources (cdc, who, nice...). Default: all.")
@click.option("--min-chars", default=200, show_default=True, type=click.IntRange(0))
@click.option("--terms-file", type=click.Path(), help="YAML mapping source -> license text (overrides).")
@_canary_options
@_common
def guidelines(src, sources, min_chars, terms_file, canaries, canary_seed, canary_repeats, out, force, as_json):
    """Clinical guidelines JSONL -> completion corpus, each source's terms in the lineage.

    \b
    Example:
      tools build-corpus guidelines --src open_guidelines.jsonl --source cdc,who,wikidoc --out runs/guidelines
    """
    from .guidelines import build_corpus

    art = build_corpus(src, out, sources=_multi(sources), min_chars=min_chars, terms_file=terms_file,
                       canaries=_spec(canaries, canary_seed, canary_repeats), force=force, log=log)
    _report(art, as_json, f"{sum(art.extra['per_source'].values()):,} guidelines from "
                          f"{', '.join(art.extra['per_source'])}")


@click.command("general")
@_common
def general(out, force, as_json):
    """General English shipped with Python (CPython's topic docs, PSF-2.0): the replay half, for
    `tools stage ... --replay`; `tools eval general` scores the other half.

    \b
    Example:
      tools build-corpus general --out runs/general
      tools stage completion --base-model runs/base --corpus runs/notes --replay runs/general --replay-ratio 0.1 ...
    """
    from .general import build_general

    art = build_general(out, force=force, log=log)
    _report(art, as_json, f"{art.extra['stats']['documents']} documents")


@click.command("pubmedqa")
@click.option("--src", type=click.Path(), help="PubMedQA JSONL or ori_pqal.json (default: bundled dev.jsonl).")
@click.option("--allow-test-ids", is_flag=True, help="Do not drop the 500 benchmark test PMIDs.")
@_common
def pubmedqa(src, allow_test_ids, out, force, as_json):
    """PubMedQA -> ChatML SFT set (user: context then question; assistant: label. long answer).

    \b
    Example:
      tools build-dataset pubmedqa --out runs/pubmedqa
      tools build-dataset pubmedqa --src ori_pqal.json --out runs/pubmedqa   # test ids dropped
    """
    from .sft import build_pubmedqa

    art = build_pubmedqa(out, src=src, allow_test_ids=allow_test_ids, force=force, log=log)
    _report(art, as_json, f"{art.extra['items']} items {art.extra['labels']}, "
                          f"{art.extra['excluded_test_ids']} test ids dropped")


@click.command("medqa")
@click.option("--src", type=click.Path(), help="MedQA JSONL, 4 or 5 options (default: bundled dev.jsonl).")
@click.option("--allow-test", is_flag=True, help="Do not drop questions of the MedQA test set.")
@_common
def medqa(src, allow_test, out, force, as_json):
    """MedQA -> ChatML SFT set (user: question and "(A) text" lines; assistant: "(X) text").

    \b
    Example:
      tools build-dataset medqa --src phrases_no_exclude_train.jsonl --out runs/medqa
    """
    from .sft import build_medqa

    art = build_medqa(out, src=src, allow_test=allow_test, force=force, log=log)
    _report(art, as_json, f"{art.extra['items']} items, options {art.extra['options']}")


@click.command("qa")
@click.option("--src", required=True, type=click.Path(), help="CSV (with header) or JSONL.")
@click.option("--question-col", required=True)
@click.option("--answer-col", required=True)
@click.option("--filter", "filters", multiple=True, help="Keep rows where COLUMN=VALUE (repeatable, all must hold).")
@click.option("--format", "fmt", type=click.Choice(["chatml", "completion"]), default="chatml", show_default=True)
@click.option("--system", default=None, help="System prompt text for ChatML rows.")
@click.option("--system-prompt", type=click.Choice(["pubmedqa", "medqa"]), default=None,
              help="Use a MediLoRA system prompt instead.")
@click.option("--id-col", default=None, help="Column holding a stable id (default: line number).")
@click.option("--license", "license_", default="unknown (user-supplied Q&A)", show_default=True)
@_common
def qa(src, question_col, answer_col, filters, fmt, system, system_prompt, id_col, license_, out, force, as_json):
    """Question/answer CSV or JSONL -> ChatML (or completion) rows.

    \b
    Example:
      tools build-dataset qa --src medquad.csv --question-col question --answer-col answer \\
          --filter qtype=symptoms --out runs/qa-symptoms
    """
    from .qa import build_qa

    if system and system_prompt:
        raise UserError("--system and --system-prompt exclude each other", field="--system-prompt")
    if system_prompt:
        from .sft import system_prompt as sp
        system = sp(system_prompt)
    art = build_qa(src, out, question_col=question_col, answer_col=answer_col, filters=filters, fmt=fmt,
                   system=system, id_col=id_col, license=license_, force=force, log=log)
    _report(art, as_json, f"{art.extra['items']} rows ({fmt})")


@click.command("split")
@click.argument("dataset", type=click.Path())
@click.option("--ratios", default="0.8,0.1,0.1", show_default=True, help="train,validation,test")
@click.option("--stratify-by", default=None, help="A meta field (or top-level field) to stratify on, e.g. label.")
@click.option("--seed", default=0, show_default=True, type=int)
@artifact_options("Output folder (default: DATASET-split).")
def split(dataset, ratios, stratify_by, seed, out, force, as_json):
    """Deterministic stratified train/validation/test split of a dataset artifact.

    \b
    Example:
      tools split runs/pubmedqa --ratios 0.8,0.1,0.1 --stratify-by label --seed 0 --out runs/pubmedqa-split
    """
    from .split import parse_ratios, split_dataset

    r = parse_ratios(ratios)
    out = out or str(dataset).rstrip("/") + "-split"
    art = split_dataset(dataset, out, ratios=r, stratify_by=stratify_by, seed=seed, force=force, log=log)
    sp = art.extra["split"]
    _report(art, as_json, ", ".join(f"{k} {v['items']}" for k, v in sp.items()))


@click.command("decontaminate")
@click.option("--train", "train", required=True, type=click.Path(), help="Dataset or corpus artifact.")
@click.option("--against", multiple=True,
              help="pubmedqa, medqa, mmlu-medical, a benchmark JSONL or an artifact (repeatable; default: the three).")
@click.option("--ngram", default=13, show_default=True, type=int)
@click.option("--min-coverage", default=0.2, show_default=True, type=float,
              help="Flag items holding at least this share of a benchmark item's n-grams.")
@click.option("--min-shared", default=None, type=click.IntRange(1),
              help="Also flag items sharing at least this many n-grams with one benchmark item.")
@click.option("--write-clean", is_flag=True, help="Write a cleaned copy (same stage and files) to OUT.")
@_common
def decontaminate(train, against, ngram, min_coverage, min_shared, write_clean, out, force, as_json):
    """Find training items sharing n-grams with benchmark test items; report (and clean).

    \b
    Example:
      tools decontaminate --train runs/pubmedqa --against pubmedqa --against medqa --out runs/pubmedqa-clean --write-clean
    """
    from .decontam import BUILTIN
    from .decontam import decontaminate as run

    art = run(train, out, against=_multi(against) or BUILTIN, ngram=ngram, min_coverage=min_coverage, min_shared=min_shared,
              write_clean=write_clean, force=force, log=log)
    d = art.extra["decontamination"]
    if not as_json:
        for it in d["items"][:20]:
            log(f"  {it['file']}:{it['id']}: {'; '.join(it['reasons'])}")
    _report(art, as_json, f"{d['flagged']} of {d['train_items']} items flagged {d['per_benchmark']}")


def register(cli: click.Group) -> None:
    from tools.cli import group

    for cmd in (mimic, textbooks, guidelines, general):
        group("build-corpus").add_command(cmd)
    for cmd in (pubmedqa, medqa, qa):
        group("build-dataset").add_command(cmd)
    cli.add_command(split)
    cli.add_command(decontaminate)
