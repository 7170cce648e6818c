"""Quantization under a budget: the smallest GGUF whose quality and memory are within what the user states.

Candidates are llama.cpp's stock file types (the IQ types only with an importance matrix) and a small
family of per-tensor mixes built with llama.cpp's own tensor-type overrides (``tt_overrides``, what
``llama-quantize --tensor-type`` sets): for each stock base type, one tensor group one step up or one
step down a ladder of llama.cpp types, the groups being the embeddings and output (``token_embd``,
``output``), ``attn_v`` and ``ffn_down`` (the tensors llama.cpp's own mixes already single out); the
embeddings and output also two steps up or down (:data:`STEPS`): every stock type keeps them at Q6_K/Q8_0,
and in a small model they are a large share of the file (SmolLM2-135M's tied 49152 x 576 ``token_embd``
is 30 of its 92 MB at Q4_0). The ladder of a group is ``Q2_K Q3_K Q4_K Q5_K Q6_K Q8_0`` when its rows are a multiple of 256, else
``Q4_0 Q4_1 Q5_0 Q5_1 Q8_0``. llama.cpp's dry run gives every candidate's exact tensor types and size
without writing it, so duplicates (a mix llama.cpp turns into another candidate) are dropped and
sizes are known before anything is measured.

The search measures candidates from the smallest up, each against the f16 source on held-out text
(mean KL with its 95 % interval, top-1 agreement, perplexity: ``release.quantgap``), and stops at the
first within the quality budget: every larger one cannot win. ``--max-size`` and ``--max-ram`` (weights
+ KV cache at ``--ctx``, ``release.fit``) drop candidates before anything is measured; without a
quality budget the lowest mean KL among those that fit wins.

``acc-drop=N`` (combinable with ``kl=``): accuracy points lost against the f16 on dev items by
log-likelihood, paired item by item; a candidate meets it when the upper end of the drop's 95 % interval
is at most N points (the rule and the items: ``evals.accdrop``). The f16 is scored once; a candidate's
accuracy is measured only when it is otherwise within budget (or with ``--measure-all``), since one over
the KL budget cannot win anyway. The scorer is evaluation: release cannot import evals, so evals.cli
registers it here (:func:`register_accuracy`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from tools.artifact import Stage, is_artifact
from tools.errors import UserError
from tools.ggufpath import default_threads, resolve_gguf
from tools.io import write_json
from tools.plotting import pyplot, save_png
from tools.progress import log

from .fit import needed_bytes, shape_of
from .ggufinfo import gguf_filename, gguf_module, is_quantized, parse_size, read_gguf
from .quantgap import Reference, Scoring, gap_figures, heldout_text, read_text
from .quantize import QuantOptions, load_imatrix, needs_imatrix, plan, quantize_stage

STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
         "Q5_K_M", "Q6_K", "Q8_0")
STOCK_IMATRIX = ("IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL")
GROUPS = {"embd": r"^(token_embd|output)\.weight$", "attn_v": r"attn_v\.weight$", "ffn_down": r"ffn_down\.weight$"}
STEPS = {"embd": (1, -1, 2, -2), "attn_v": (1, -1), "ffn_down": (1, -1)}  # rungs up (+) / down (-) the ladder
LADDER_256 = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LADDER_32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
MIN_TOKENS = 4096
_ACCURACY: list[Callable] = []  # evals.accdrop.accuracy_probe, registered by evals.cli


def register_accuracy(factory: Callable) -> None:
    """Set the ``acc-drop`` scorer factory: ``factory(data_spec, threads)`` -> a probe with ``inputs``,
    ``params()``, ``describe()``, ``reference(f16, work) -> {items, accuracy, accuracy_ci95}`` and
    ``score(gguf, work) -> {items, accuracy, accuracy_ci95, lost, gained, acc_drop_points,
    acc_drop_ci95_points}`` (``evals.accdrop.AccuracyProbe``)."""
    _ACCURACY[:] = [factory]


def accuracy_probe(data: str | None, threads: int | None = None):
    """The registered scorer's probe of ``--budget-data`` (None: its default, PubMedQA dev)."""
    if not _ACCURACY:
        raise UserError("acc-drop needs the evals package (run it through the `tools` CLI)", field="--budget")
    return _ACCURACY[0](data, threads)


@dataclass(frozen=True)
class Budget:
    """What the chosen file must meet: ``max_kl`` (mean KL vs the source, nats), ``max_size`` (file bytes),
    ``max_ram`` (bytes of weights + KV cache at ``ctx`` tokens), ``max_acc_drop`` (accuracy points lost
    against the source on dev items: the upper end of the paired 95 % interval, ``evals.accdrop``)."""
    max_kl: float | None = None
    max_size: int | None = None
    max_ram: int | None = None
    ctx: int = 4096
    max_acc_drop: float | None = None

    @property
    def quality(self) -> bool:
        """A quality budget is set (the search stops at the first candidate within it)."""
        return self.max_kl is not None or self.max_acc_drop is not None

    def describe(self) -> str:
        parts = [f"mean KL <= {self.max_kl:g}"] if self.max_kl is not None else []
        if self.max_acc_drop is not None:
            parts.append(f"accuracy drop <= {self.max_acc_drop:g} points (95 % upper bound)")
        if self.max_size:
            parts.append(f"size <= {self.max_size / 1e6:.1f} MB")
        if self.max_ram:
            parts.append(f"memory <= {self.max_ram / 1e9:.2f} GB at {self.ctx} tokens")
        return ", ".join(parts)


def parse_budget(budget: tuple[str, ...] | list[str], max_size: str | None, max_ram: str | None, ctx: int) -> Budget:
    """``--budget kl=0.05`` / ``--budget acc-drop=2`` (repeatable, combinable), ``--max-size 90M``,
    ``--max-ram 4G`` -> Budget."""
    got: dict[str, float] = {}
    for b in budget:
        key, _, val = b.partition("=")
        key = key.strip().lower()
        if key not in ("kl", "acc-drop") or not val:
            raise UserError(f"unknown budget {b!r} (kl=NATS or acc-drop=POINTS, e.g. kl=0.05, acc-drop=2)",
                            field="--budget")
        try:
            got[key] = float(val)
        except ValueError:
            raise UserError(f"not a number: {val!r}", field="--budget") from None
    if "kl" in got and not got["kl"] > 0:
        raise UserError("a KL budget must be more than 0", field="--budget")
    if "acc-drop" in got and not 0 <= got["acc-drop"] <= 100:
        raise UserError("an acc-drop budget is accuracy points from 0 to 100", field="--budget")
    if ctx < 1:
        raise UserError("must be at least 1 token", field="--ctx")
    return Budget(max_kl=got.get("kl"), max_size=parse_size(max_size, "--max-size") if max_size else None,
                  max_ram=parse_size(max_ram, "--max-ram") if max_ram else None, ctx=ctx,
                  max_acc_drop=got.get("acc-drop"))


@dataclass(frozen=True)
class Recipe:
    """One candidate: a llama.cpp file type and tensor-type overrides on top of it."""
    qtype: str
    overrides: tuple[tuple[str, str], ...] = ()
    moves: tuple[tuple[str, str], ...] = ()  # (group, type) for the label

    @property
    def label(self) -> str:
        return self.qtype + "".join(f" +{g}={t}" for g, t in self.moves)

    @property
    def encoding(self) -> str:
        return self.qtype + "".join(f"-{g.upper()}.{t}" for g, t in self.moves)


@dataclass
class Row:
    recipe: Recipe
    stock: bool
    tensor_bytes: int
    types: dict = field(repr=False, default_factory=dict)
    figures: dict | None = None
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    ram_bytes: int | None = None
    status: str = "not measured"
    accuracy: dict | None = None  # acc-drop budgets: the probe's figures against the f16
    same_as: list = field(default_factory=list)  # other recipes llama.cpp turns into exactly this file
    seconds: float = 0.0  # quantizing + measuring it

    def as_dict(self) -> dict:
        f = self.figures or {}
        return {"recipe": self.recipe.label, "type": self.recipe.qtype, "stock": self.stock, "same_as": self.same_as,
                "overrides": [list(o) for o in self.recipe.overrides], "size_bytes": self.size_bytes,
                "predicted_tensor_bytes": self.tensor_bytes, "bits_per_weight": self.bits_per_weight,
                "ram_bytes": self.ram_bytes, "status": self.status, "mean_kl": f.get("mean_kl"),
                "mean_kl_ci95": f.get("mean_kl_ci95"), "top1_agreement": f.get("top1_agreement"),
                "perplexity": f.get("quant_perplexity"), "ref_perplexity": f.get("ref_perplexity"),
                "tokens_scored": f.get("tokens_scored"), "accuracy": self.accuracy, "seconds": round(self.seconds, 2)}


def _ladder_step(types: list[str], rows: list[int], step: int) -> str | None:
    """The type one ``step`` up/down the ladder from a group's (most common) type, or None at the end."""
    g = gguf_module()
    ladder = LADDER_256 if all(r % 256 == 0 for r in rows) else LADDER_32
    cur = max(set(types), key=types.count)
    bits = {t: 8 * g.GGML_QUANT_SIZES[g.GGMLQuantizationType[t]][1] / g.GGML_QUANT_SIZES[g.GGMLQuantizationType[t]][0]
            for t in set(ladder) | {cur} if t in g.GGMLQuantizationType.__members__}
    if cur in ladder:
        i = ladder.index(cur)
    else:  # a type off the ladder (F16, IQ4_NL, ...): the nearest rung by bits per weight
        i = min(range(len(ladder)), key=lambda k: abs(bits[ladder[k]] - bits.get(cur, 16.0)))
    j = i + step
    return ladder[j] if 0 <= j < len(ladder) and ladder[j] != cur else None


def family(base: str, base_plan: dict, shapes: dict) -> list[Recipe]:
    """The documented mixes around ``base``: each group one step up and one step down (the embeddings and
    output also two, :data:`STEPS`)."""
    out = []
    for group, pattern in GROUPS.items():
        names = [n for n in base_plan["types"] if re.search(pattern, n)]
        if not names:
            continue
        for step in STEPS[group]:
            t = _ladder_step([base_plan["types"][n] for n in names], [shapes[n][0] for n in names], step)
            if t:
                out.append(Recipe(base, ((pattern, t),), ((group, t),)))
    return out


def enumerate_rows(src: Path, stock: tuple[str, ...], imat: dict | None, threads: int,
                   mix_bases: tuple[str, ...] | None = None) -> list[Row]:
    """Every candidate, planned by llama.cpp's dry run; duplicates (same tensor types) dropped, stock first."""
    shapes = {t["name"]: t["shape"] for t in read_gguf(src)["tensors"]}
    rows, seen = [], {}

    def add(recipe: Recipe, is_stock: bool, p: dict) -> None:
        key = tuple(sorted(p["types"].items()))
        if p["needs_imatrix"] and not imat:
            return
        if key in seen:
            seen[key].same_as.append(recipe.label)
            return
        seen[key] = Row(recipe, is_stock, p["tensor_bytes"], p["types"])
        rows.append(seen[key])

    plans = {}
    for q in stock:
        plans[q] = plan(src, q, imatrix=imat, threads=threads)
        add(Recipe(q), True, plans[q])
    for q in stock if mix_bases is None else [b for b in mix_bases if b in plans]:
        for r in family(q, plans[q], shapes):
            add(r, False, plan(src, q, overrides=r.overrides, imatrix=imat, threads=threads))
    return rows


@dataclass(frozen=True)
class SearchSpec:
    """Everything the search needs besides the source: the budget, the stock types to start from
    (None: :data:`STOCK`, plus :data:`STOCK_IMATRIX` with an imatrix), the importance matrix, the held-out
    text (None: PubMedQA test abstracts), scored tokens, and whether to measure every candidate."""
    budget: Budget
    types: tuple[str, ...] | None = None
    imatrix: str | os.PathLike | None = None
    text_file: str | os.PathLike | None = None
    min_tokens: int = MIN_TOKENS
    window: int = 512
    threads: int | None = None
    measure_all: bool = False
    mix_bases: tuple[str, ...] | None = None  # the stock types mixes are built around [all of them]
    acc_data: str | None = None  # acc-drop: the dev items (evals.accdrop grammar) [PubMedQA dev]


def _stock(spec: SearchSpec) -> tuple[str, ...]:
    if spec.types is not None:
        return spec.types
    return STOCK + (STOCK_IMATRIX if spec.imatrix else ())


def _within_kl(row: Row, b: Budget) -> bool:
    return b.max_kl is None or (row.figures is not None and row.figures["mean_kl"] <= b.max_kl)


def _within(row: Row, b: Budget) -> bool:
    """Within the quality budget: the KL, and the upper end of the accuracy drop's 95 % interval."""
    return _within_kl(row, b) and (b.max_acc_drop is None or (
        row.accuracy is not None and row.accuracy["acc_drop_ci95_points"][1] <= b.max_acc_drop))


def _status(row: Row, b: Budget) -> str:
    if not _within_kl(row, b):
        return "over the KL budget"
    if not _within(row, b):
        a = row.accuracy
        return (f"over the acc-drop budget (drop {a['acc_drop_points']:g} points, 95 % CI "
                f"[{a['acc_drop_ci95_points'][0]:g}, {a['acc_drop_ci95_points'][1]:g}])" if a else "accuracy not measured")
    return "within budget"


def _fits(row: Row, b: Budget) -> str | None:
    """Why a candidate cannot be chosen before measuring it (size or memory), or None."""
    if b.max_size and row.size_bytes > b.max_size:
        return f"over --max-size ({row.size_bytes / 1e6:.1f} MB)"
    if b.max_ram and row.ram_bytes > b.max_ram:
        return f"over --max-ram ({row.ram_bytes / 1e9:.2f} GB at {b.ctx} tokens)"
    return None


def _measure(row: Row, src: Path, ref: Reference, work: Path, opts: QuantOptions):
    """Quantize one candidate (a ``gguf`` artifact under ``work``) and score it against the reference."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", row.recipe.encoding)
    art = quantize_stage(src, row.recipe.qtype, work / slug,
                         replace(opts, overrides=row.recipe.overrides, label=row.recipe.label,
                                 name=gguf_filename(read_gguf(src, tensors=False)["metadata"], row.recipe.encoding)))
    row.size_bytes, row.bits_per_weight = art.extra["size_bytes"], art.extra["bits_per_weight"]
    row.figures = gap_figures(ref.score(art.path / art.extra["file"], f"measure {row.recipe.label}"))
    return art


def _planned_rows(src: Path, spec: SearchSpec) -> tuple[list[Row], dict]:
    """Every candidate with its dry-run size, bits per weight and memory, smallest first; the model's shape."""
    imat = load_imatrix(_imatrix_file(spec.imatrix)) if spec.imatrix else None
    rows = enumerate_rows(src, _stock(spec), imat, default_threads(spec.threads), spec.mix_bases)
    info = read_gguf(src)
    overhead = info["size_bytes"] - sum(h["bytes"] for h in info["tensor_types"].values())
    shape = shape_of(info)
    for r in rows:  # predicted from the dry run, replaced by the real file's figures once quantized
        r.size_bytes = r.tensor_bytes + overhead
        r.ram_bytes = needed_bytes({**shape, "weights_bytes": r.tensor_bytes}, spec.budget.ctx)
        r.bits_per_weight = round(8 * r.tensor_bytes / info["parameters"], 4)
    rows.sort(key=lambda r: (r.size_bytes, not r.stock, r.recipe.label))
    return rows, shape


def search(src: Path, spec: SearchSpec, work: Path, text: Path, probe=None) -> tuple[list[Row], Row | None, dict, float]:
    """Run the search in ``work``; returns every row, the chosen one (or None), the ``gguf`` artifacts by
    recipe and the seconds spent before measuring (dry runs, the reference, the f16's accuracy). ``probe``:
    the acc-drop scorer (:func:`accuracy_probe`), needed when the budget has ``max_acc_drop``."""
    t0 = time.monotonic()
    b = spec.budget
    opts = QuantOptions(imatrix=spec.imatrix, threads=spec.threads)
    rows, shape = _planned_rows(src, spec)
    log(f"{len(rows)} candidates ({sum(r.stock for r in rows)} stock types, {sum(not r.stock for r in rows)} "
        f"mixes); budget: {b.describe() or 'none (lowest KL)'}")
    scoring = Scoring(ctx=spec.window, max_tokens=-(-spec.min_tokens // (spec.window - 1)) * spec.window,
                      threads=spec.threads)
    ref = Reference(src, text, scoring, work / "reference")
    if sum(len(w) - 1 for w in ref.windows) < spec.min_tokens:
        raise UserError(f"the held-out text gives {sum(len(w) - 1 for w in ref.windows)} scored tokens, fewer than "
                        f"{spec.min_tokens}: give a longer --text", path=str(text))
    if probe is not None:
        f = probe.reference(src, work)
        log(f"f16 accuracy on {probe.describe()}: {f['accuracy']:.3f} {f['accuracy_ci95']}")
    chosen, arts, setup = None, {}, time.monotonic() - t0
    for r in rows:
        why = _fits(r, b)
        if why:
            r.status = why
            continue
        if chosen is not None and b.quality and not spec.measure_all:
            r.status = f"skipped: larger than {chosen.recipe.label}, already within budget"
            continue
        t1 = time.monotonic()
        art = arts[r.recipe.label] = _measure(r, src, ref, work / "candidates", opts)
        r.ram_bytes = needed_bytes({**shape, "weights_bytes": art.extra["memory"]["weights_bytes"]}, b.ctx)
        why = _fits(r, b)  # the real file's size
        if probe is not None and ((not why and _within_kl(r, b)) or spec.measure_all):
            r.accuracy = probe.score(art.path / art.extra["file"], work)
        r.seconds = time.monotonic() - t1
        r.status = why or _status(r, b)
        better = chosen is None or (not b.quality and r.figures["mean_kl"] < chosen.figures["mean_kl"])
        if not why and _within(r, b) and better:
            if chosen is not None:  # only the chosen file is kept on disk (a 7B candidate is gigabytes)
                shutil.rmtree(arts.pop(chosen.recipe.label).path)
            chosen = r
        else:
            shutil.rmtree(arts.pop(r.recipe.label).path)
    return rows, chosen, arts, setup


def _imatrix_file(imatrix) -> Path:
    from .imatrix import resolve_imatrix  # lazy: `tools --help` imports this module (release.cli)
    return resolve_imatrix(imatrix)[0]


def _best_line(rows: list[Row], b: Budget) -> str:
    measured = [r for r in rows if r.figures is not None]
    if not measured:
        return "no candidate fits the size/memory limits (smallest: " + (
            f"{rows[0].recipe.label}, {rows[0].size_bytes / 1e6:.1f} MB)" if rows else "none)")
    scored = [r for r in measured if r.accuracy is not None and _within_kl(r, b)]
    if scored:  # acc-drop: the smallest upper bound of the drop among those within the KL budget
        best = min(scored, key=lambda r: (r.accuracy["acc_drop_ci95_points"][1], r.figures["mean_kl"]))
    else:
        best = min(measured, key=lambda r: r.figures["mean_kl"])
    a = best.accuracy
    drop = (f", accuracy drop {a['acc_drop_points']:g} points [95 % CI {a['acc_drop_ci95_points'][0]:g}, "
            f"{a['acc_drop_ci95_points'][1]:g}] on {a['items']} items" if a else "")
    return (f"best found {best.recipe.label}: mean KL {best.figures['mean_kl']:.4g}{drop}, "
            f"{best.size_bytes / 1e6:.1f} MB, {best.bits_per_weight:.2f} bits/weight")


def _acc_cells(r: Row) -> str:
    a = r.accuracy
    if not a:
        return " - | - |"
    lo, hi = a["accuracy_ci95"]
    dlo, dhi = a["acc_drop_ci95_points"]
    return (f" {100 * a['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {a['acc_drop_points']:+.2f} "
            f"[{dlo:+.2f}, {dhi:+.2f}] ({a['lost']} lost, {a['gained']} gained) |")


def candidates_markdown(rows: list[Row], spec: SearchSpec, src_name: str, chosen: Row | None) -> str:
    f = next((r.figures for r in rows if r.figures), {})
    acc = spec.budget.max_acc_drop is not None
    a = next((r.accuracy for r in rows if r.accuracy), None)
    head = "| recipe | stock | size MB | bits/weight | memory GB | mean KL [95 % CI] | top-1 | perplexity |"
    if acc:
        head += " accuracy [95 % CI] | drop vs f16, points [95 % CI] |"
    L = [f"Candidates for `{src_name}`, budget: {spec.budget.describe() or 'none (lowest mean KL)'}. Mean KL(f16 || "
         f"candidate) with its 95 % interval (batch means over 32-token blocks), top-1 agreement and perplexity on "
         f"{f.get('tokens_scored', 'n/a')} held-out tokens (f16 perplexity {f.get('ref_perplexity', 'n/a')}); memory: "
         f"weights + f16 KV cache at {spec.budget.ctx} tokens. Sizes of candidates not measured are llama.cpp's dry "
         "run."]
    if acc:
        L[0] += (f" Accuracy by log-likelihood on {a['items'] if a else 'the'} dev items ({spec.acc_data or 'pubmedqa-dev'}"
                 f"; f16 {100 * a['ref_accuracy']:.1f}%" if a else f" Accuracy by log-likelihood on dev items "
                 f"({spec.acc_data or 'pubmedqa-dev'}") + ("); drop = f16 accuracy - candidate accuracy on the same items "
                 "with its paired 95 % interval (Wald); a candidate meets acc-drop=N when the interval's upper end is "
                 "<= N. Measured only for candidates otherwise within budget.")
    L += ["", head + " status |", "|---" * (head.count("|") - 1) + "|---|"]
    for r in rows:
        d = r.as_dict()
        kl = f"{d['mean_kl']:.4g} [{d['mean_kl_ci95'][0]:.4g}, {d['mean_kl_ci95'][1]:.4g}]" if r.figures else "-"
        top = f"{100 * d['top1_agreement']:.1f}%" if r.figures else "-"
        ppl = f"{d['perplexity']:.3f}" if r.figures else "-"
        mark = "**" if r is chosen else ""
        same = f" (= {', '.join(r.same_as)})" if r.same_as else ""
        L.append(f"| {mark}{d['recipe']}{mark}{same} | {'yes' if r.stock else 'mix'} | {r.size_bytes / 1e6:.2f} | "
                 f"{r.bits_per_weight:.3f} | {r.ram_bytes / 1e9:.3f} | {kl} | {top} | {ppl} |"
                 + (_acc_cells(r) if acc else "") + f" {r.status} |")
    return "\n".join(L) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (smaller or equal size and KL, one strictly)."""
    out = []
    for i, (s, k) in enumerate(points):
        if not any((s2 <= s and k2 <= k and (s2 < s or k2 < k)) for j, (s2, k2) in enumerate(points) if j != i):
            out.append(i)
    return sorted(out, key=lambda i: points[i][0])


def plot_pareto(rows: list[Row], chosen: Row | None, b: Budget, path: Path) -> None:
    plt = pyplot()
    m = [r for r in rows if r.figures is not None]
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    pts = [(r.size_bytes / 1e6, max(r.figures["mean_kl"], 1e-6)) for r in m]
    front = pareto_front(pts)
    if front:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="#999999", lw=1,
                label="Pareto front")
    for r, (x, y) in zip(m, pts):
        ax.scatter([x], [y], marker="s" if r.stock else "o", s=36 if r.stock else 16,
                   color="#cc3311" if r.stock else "#4477aa", zorder=3)
        if r.stock:
            ax.annotate(r.recipe.label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if chosen is not None:
        ax.scatter([chosen.size_bytes / 1e6], [max(chosen.figures["mean_kl"], 1e-6)], marker="*", s=220,
                   facecolor="none", edgecolor="#228833", lw=1.5, zorder=4, label=f"chosen: {chosen.recipe.label}")
    if b.max_kl is not None:
        ax.axhline(b.max_kl, color="#228833", ls="--", lw=1, label=f"budget KL {b.max_kl:g}")
    ax.scatter([], [], marker="s", color="#cc3311", label="llama.cpp stock type")
    ax.scatter([], [], marker="o", color="#4477aa", label="mix (tensor-type overrides)")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL(f16 || candidate), nats")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def _check(src: Path, spec: SearchSpec) -> tuple[Path, dict]:
    gpath = resolve_gguf(src)
    info = read_gguf(gpath, tensors=False)
    if is_quantized(read_gguf(gpath)):
        raise UserError(f"already quantized ({info['file_type']}): the search starts from the f16/bf16/f32 GGUF",
                        path=str(gpath))
    for q in spec.types or ():
        if needs_imatrix(q) and not spec.imatrix:
            raise UserError(f"{q} needs an importance matrix: pass --imatrix", field="--types")
    if spec.text_file is not None:
        read_text(spec.text_file)
    if spec.window < 8 or spec.min_tokens < 2:
        raise UserError("the scoring window must be >= 8 tokens and the scored tokens >= 2", field="--min-tokens")
    if spec.acc_data is not None and spec.budget.max_acc_drop is None:
        raise UserError("--budget-data gives the items of an acc-drop budget: add --budget acc-drop=POINTS",
                        field="--budget-data")
    return gpath, info


def quantize_budget(src: str | os.PathLike, out: str | os.PathLike, spec: SearchSpec, *, force: bool = False):
    """`tools quantize SRC --budget ...`: artifact ``out`` (stage ``gguf``) holding the chosen GGUF,
    candidates.json / candidates.md (every candidate) and pareto.png. No candidate within the budget:
    UserError naming the best one found (exit 2), nothing written. An acc-drop budget's items are checked
    (test items refused) before anything runs."""
    from .imatrix import resolve_imatrix  # lazy: `tools --help` imports this module (release.cli)

    target = Path(src)
    gpath, info = _check(target, spec)
    b = spec.budget
    probe = accuracy_probe(spec.acc_data, spec.threads) if b.max_acc_drop is not None else None
    inputs = [target if is_artifact(target) else gpath] + ([resolve_imatrix(spec.imatrix)[1]] if spec.imatrix else []) \
        + ([Path(spec.text_file)] if spec.text_file else []) + (probe.inputs if probe else [])
    params = {"budget": {"max_kl": b.max_kl, "max_size": b.max_size, "max_ram": b.max_ram, "ctx": b.ctx,
                         **({"max_acc_drop": b.max_acc_drop, "accuracy": probe.params()} if probe else {})},
              "types": list(_stock(spec)), "imatrix": bool(spec.imatrix), "min_tokens": spec.min_tokens,
              "window": spec.window, "measure_all": spec.measure_all, "mix_bases": spec.mix_bases,
              "text": Path(spec.text_file).name if spec.text_file else "pubmedqa-test-heldout"}
    with Stage("gguf", out, params, inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        t0 = time.monotonic()
        text = Path(spec.text_file) if spec.text_file else st.path("heldout.txt")
        if not spec.text_file:
            text.write_text(heldout_text(80), encoding="utf-8")
        work = st.path("search")
        work.mkdir(exist_ok=True)
        rows, chosen, arts, setup = search(gpath, spec, work, text, probe)
        if chosen is None:
            raise UserError(f"no candidate within the budget ({b.describe()}); {_best_line(rows, b)}", field="--budget")
        art = arts[chosen.recipe.label]
        os.replace(art.path / art.extra["file"], st.path(art.extra["file"]))
        shutil.rmtree(work)
        table = [r.as_dict() for r in rows]
        write_json(st.path("candidates.json"), {"source": gpath.name, "budget": params["budget"], "chosen":
                                                chosen.recipe.label, "setup_seconds": round(setup, 2),
                                                "candidates": table})
        st.path("candidates.md").write_text(candidates_markdown(rows, spec, gpath.name, chosen), encoding="utf-8")
        plot_pareto(rows, chosen, b, st.path("pareto.png"))
        measured = sum(r.figures is not None for r in rows)
        st.extra.update({k: v for k, v in art.extra.items() if k not in ("shards", "seconds")})
        st.extra.update({"shards": [art.extra["file"]], "budget": params["budget"], "budget_text": b.describe(),
                         "chosen": chosen.as_dict(), "candidates": len(rows), "measured": measured,
                         "seconds": round(time.monotonic() - t0, 1)})
        log(f"chose {chosen.recipe.label} ({chosen.size_bytes / 1e6:.1f} MB, mean KL "
            f"{chosen.figures['mean_kl']:.4g}); {measured} of {len(rows)} candidates measured")
    return st.result


def summary_lines(art) -> list[str]:
    """What `tools quantize --budget` prints: the choice and where the table is."""
    c = art.extra["chosen"]
    lo, hi = c["mean_kl_ci95"]
    return [f"{art.path / art.extra['file']}  {c['recipe']}  {c['size_bytes'] / 1e6:.1f} MB  "
            f"{c['bits_per_weight']:.2f} bits/weight",
            f"mean KL {c['mean_kl']:.4g} [{lo:.4g}, {hi:.4g}], top-1 {100 * c['top1_agreement']:.1f}%, perplexity "
            f"{c['perplexity']:.3f} (f16 {c['ref_perplexity']:.3f}) on {c['tokens_scored']} held-out tokens",
            *([accuracy_line(c["accuracy"])] if c.get("accuracy") else []),
            f"budget: {art.extra['budget_text'] or 'none'}; {art.extra['measured']} of {art.extra['candidates']} "
            f"candidates measured; table: {art.path / 'candidates.md'}, plot: {art.path / 'pareto.png'}"]


def accuracy_line(a: dict) -> str:
    """A candidate's acc-drop figures in one line (the summary, the card, the verdict)."""
    lo, hi = a["accuracy_ci95"]
    dlo, dhi = a["acc_drop_ci95_points"]
    return (f"accuracy {100 * a['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] on {a['items']} dev items (f16 "
            f"{100 * a['ref_accuracy']:.1f}%), drop {a['acc_drop_points']:+.2f} points [95 % CI {dlo:+.2f}, {dhi:+.2f}] "
            f"({a['lost']} items lost, {a['gained']} gained)")


def load_candidates(art_path: Path) -> dict:
    return json.loads((Path(art_path) / "candidates.json").read_text(encoding="utf-8"))
