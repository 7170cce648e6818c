"""The `tools` command line: one Click group, verbs registered by each package's ``cli`` module.

Exit codes: 0 done, 1 the work failed, 2 bad usage or bad input (one line, no traceback unless
``--debug``).
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from . import __version__
from .errors import UserError, WorkError

# Each package's verbs live in its one CLI module, which exposes ``register(group)``; listed here so the
# CLI map lives in one place.
COMMAND_MODULES = ["corpora.cli", "recipes.cli", "release.cli", "evals.cli", "tools.verbs"]

OFFLINE_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
               "DO_NOT_TRACK": "1"}


PACKAGES = {"corpora": "Corpora", "recipes": "Recipes", "release": "Release", "evals": "Evals", "tools": "Pipeline"}


def verb_map(group: click.Group) -> dict[str, list[str]]:
    """Package title -> the verbs it registered ("bench pubmedqa", "train", ...), from the live CLI."""
    out: dict[str, list[str]] = {}
    for name in sorted(group.commands):
        cmd = group.commands[name]
        subs = [(f"{name} {s}", c) for s, c in sorted(cmd.commands.items())] if isinstance(cmd, click.Group) else [(name, cmd)]
        for full, c in subs:
            pkg = (c.callback.__module__ if c.callback else "tools").split(".")[0]
            out.setdefault(PACKAGES.get(pkg, pkg), []).append(full)
    order = list(PACKAGES.values())
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


class MediloraGroup(click.Group):
    def format_epilog(self, ctx, formatter):
        if ctx.parent is None:  # the top-level `tools --help`: every verb, by package
            import textwrap
            with formatter.section("Verbs by package"):
                for title, verbs in verb_map(self).items():
                    lines = textwrap.wrap(", ".join(verbs), 78, break_on_hyphens=False, break_long_words=False)
                    for i, line in enumerate(lines):
                        formatter.write(f"{'':<{formatter.current_indent}}{title if i == 0 else '':<9} {line}\n")
        super().format_epilog(ctx, formatter)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except UserError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except WorkError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"failed: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            msg = " ".join(str(e).split()) or type(e).__name__
            click.echo(f"failed: {type(e).__name__}: {msg} (re-run with --debug for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=MediloraGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="medilora tools")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """MediLoRA: raw clinical text in, a benchmarked, quantized GGUF out.

    Every verb writes an artifact folder with a manifest.json; `VERB --help` has an example.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    import logging
    # Import-time noise of libraries Axolotl pulls in (CUDA-only torchao kernels, a torch deprecation).
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


@cli.group("build-corpus")
def build_corpus():
    """Build completion corpora (JSONL {id, text, source})."""


@cli.group("build-dataset")
def build_dataset():
    """Build ChatML SFT sets (JSONL {id, messages, meta})."""


@cli.group("stage")
def stage():
    """Write an Axolotl training stage (axolotl.yaml, launch.sh, manifest)."""


@cli.group("bench")
def bench():
    """Benchmark a GGUF under the MediLoRA protocol."""


@cli.group("eval")
def eval_():
    """Other evaluations: published suites (open-medical), MMLU-medical, perplexity, semantic metrics."""


@cli.group("rag")
def rag():
    """Retrieval: build and query a FAISS index over a corpus."""


@cli.group("analyze")
def analyze():
    """Analyses of results (error classes, lengths)."""


def group(name: str) -> click.Group:
    """The shared sub-group ``name`` (so several packages can add verbs to it)."""
    return cli.commands[name]


def _register_all():
    for name in COMMAND_MODULES:  # a broken module fails loudly: no verb may vanish silently
        importlib.import_module(name).register(cli)


_register_all()


def main():
    cli(prog_name="tools")


if __name__ == "__main__":
    sys.exit(main())
