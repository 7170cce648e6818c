"""The options every verb shares, declared once with their help text, and the one `--json` shape.

`--json` prints one object on stdout, whatever the verb::

    {"path": ARTIFACT_FOLDER or null,
     "manifest": the artifact's manifest.json as tools.artifact reads it, or null,
     "results": the verb's figures (results.json, errors.json, compare.json, trials.json, ...), or null}

A verb that writes no artifact (inspect, rag query, memory, train --dry-run, push) prints its
figures under "results" with "path" and "manifest" null.
"""
from __future__ import annotations

import json

import click


def out_option(help: str = "Output artifact folder.", *, required: bool = False, **path_kw):
    """``--out``: where the verb's artifact goes (its default, if any, belongs in ``help``)."""
    return click.option("--out", required=required, default=None, type=click.Path(**path_kw), help=help)


force_option = click.option("--force", is_flag=True,
                            help="Re-run even if OUT already holds this artifact (same inputs and parameters).")
json_option = click.option("--json", "as_json", is_flag=True,
                           help='Print {"path", "manifest", "results"} as JSON on stdout (see tools.cli_options).')
N_GPU_LAYERS_HELP = "Layers to offload to the GPU (default: all when llama.cpp has a GPU backend, else 0)."
threads_option = click.option("--threads", type=int, default=None,
                              help="llama.cpp threads (default: OMP_NUM_THREADS, else all physical cores).")


def artifact_options(out_help: str = "Output artifact folder.", *, out_required: bool = False, **path_kw):
    """``--out``, ``--force`` and ``--json`` together (the usual trio of an artifact-writing verb)."""
    def deco(f):
        for o in (json_option, force_option, out_option(out_help, required=out_required, **path_kw)):
            f = o(f)
        return f
    return deco


def payload(art=None, results=None) -> dict:
    """The `--json` object of a verb: its artifact (or none) and its figures (or none)."""
    return {"path": str(art.path) if art is not None else None,
            "manifest": art.manifest if art is not None else None, "results": results}


def emit_json(art=None, results=None) -> None:
    click.echo(json.dumps(payload(art, results), indent=2, sort_keys=True, ensure_ascii=False, default=str))


def read_results(art, name: str = "results.json"):
    """The JSON file ``name`` of an artifact (its figures), or None if it has none."""
    p = art.path / name
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
