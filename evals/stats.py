"""Uncertainty for bench figures: Wilson intervals, seeded bootstrap, exact McNemar, paired bootstrap.

Everything here is plain Python + numpy and deterministic: the bootstrap draws item indices from
``numpy.random.default_rng(seed)``, so the same items and seed give the same interval bit for bit.

- ``wilson(k, n)``: the 95 % Wilson score interval of a proportion (accuracy, valid-response rate).
- ``bootstrap_macro_f1(...)``: percentile interval of macro-F1 over items resampled with replacement.
- ``mcnemar_exact(b, c)``: two-sided exact McNemar test on the discordant pairs
  (b = A right / B wrong, c = A wrong / B right): ``p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``.
- ``paired_bootstrap_f1(...)``: interval of macro-F1(B) - macro-F1(A) over the same resampled items.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal
BOOTSTRAP_B = 1000


def _r(x: float) -> float:
    return round(float(x), 6)


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """[low, high] Wilson score interval of k successes in n trials (``[0, 1]`` when n is 0)."""
    if n <= 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [_r(max(0.0, centre - half)), _r(min(1.0, centre + half))]


def _macro_f1_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Macro-F1 per resample from (B, L) count arrays, averaged over the labels ``present`` in each."""
    den = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, den, out=np.zeros(tp.shape, dtype=np.float64), where=den > 0)
    cnt = present.sum(axis=1)
    return np.divide((f1 * present).sum(axis=1), cnt, out=np.zeros(cnt.shape, dtype=np.float64), where=cnt > 0)


def _codes(labels: list[str], gold: list[str], pred: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    idx = {lab: i for i, lab in enumerate(labels)}
    g = np.array([idx[x] for x in gold], dtype=np.int64)
    p = np.array([idx.get(x, len(labels)) if x is not None else len(labels) for x in pred], dtype=np.int64)
    return g, p


def _resampled_f1(labels: list[str], g: np.ndarray, p: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Macro-F1 (bench.classification_metrics' definition) of each resample (rows of ``draws``)."""
    L = len(labels)
    gs, ps = g[draws], p[draws]                       # (B, n)
    tp = np.stack([((gs == j) & (ps == j)).sum(axis=1) for j in range(L)], axis=1)
    gsup = np.stack([(gs == j).sum(axis=1) for j in range(L)], axis=1)
    psup = np.stack([(ps == j).sum(axis=1) for j in range(L)], axis=1)
    present = (gsup > 0) | (psup > 0)
    return _macro_f1_counts(tp, psup - tp, gsup - tp, present)


def _draws(n: int, seed: int, b: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def bootstrap_macro_f1(labels: list[str], gold: list[str], pred: list[str | None], seed: int = 0,
                       b: int = BOOTSTRAP_B) -> list[float]:
    """[low, high] percentile (2.5 %, 97.5 %) interval of macro-F1 over ``b`` item resamples."""
    n = len(gold)
    if n == 0:
        return [0.0, 1.0]
    g, p = _codes(labels, gold, pred)
    vals = _resampled_f1(labels, g, p, _draws(n, seed, b))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return [_r(lo), _r(hi)]


def binom_cdf_half(k: int, n: int) -> float:
    """P[Binomial(n, 1/2) <= k], exactly (integer arithmetic)."""
    if k < 0:
        return 0.0
    return min(1.0, sum(math.comb(n, i) for i in range(0, min(k, n) + 1)) / 2 ** n)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    return _r(min(1.0, 2 * binom_cdf_half(min(b, c), n)))


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """Discordant counts and the exact p of two runs scored on the same items (same order)."""
    if len(a_correct) != len(b_correct):
        raise ValueError("McNemar needs the same items in both runs")
    b = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    c = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    return {"n": len(a_correct), "a_right_b_wrong": b, "a_wrong_b_right": c,
            "both_right": sum(1 for x, y in zip(a_correct, b_correct) if x and y),
            "both_wrong": sum(1 for x, y in zip(a_correct, b_correct) if not x and not y),
            "p": mcnemar_exact(b, c)}


def paired_bootstrap_f1(labels: list[str], gold: list[str], pred_a: list[str | None], pred_b: list[str | None],
                        seed: int = 0, b: int = BOOTSTRAP_B) -> dict:
    """macro-F1(B) - macro-F1(A) with its percentile interval over the same ``b`` item resamples."""
    n = len(gold)
    g, pa = _codes(labels, gold, pred_a)
    _, pb = _codes(labels, gold, pred_b)
    draws = _draws(n, seed, b)
    diff = _resampled_f1(labels, g, pb, draws) - _resampled_f1(labels, g, pa, draws)
    full = np.arange(n)[None, :]
    point = float(_resampled_f1(labels, g, pb, full)[0] - _resampled_f1(labels, g, pa, full)[0])
    lo, hi = np.percentile(diff, [2.5, 97.5])
    # two-sided bootstrap p: how often the resampled difference lands on the other side of 0
    p = min(1.0, 2 * min(float((diff <= 0).mean()), float((diff >= 0).mean())))
    return {"diff": _r(point), "ci95": [_r(lo), _r(hi)], "p": _r(p), "resamples": b, "seed": seed}


def verdict(a: str, b: str, mc: dict, alpha: float = 0.05) -> str:
    """One sentence: does B beat A at 95 % on accuracy (exact McNemar)?"""
    counts = (f"{mc['a_right_b_wrong']} items {a} right / {b} wrong, "
              f"{mc['a_wrong_b_right']} items {a} wrong / {b} right; exact McNemar p = {mc['p']:.4g}")
    if mc["p"] < alpha and mc["a_wrong_b_right"] > mc["a_right_b_wrong"]:
        return f"{b} beats {a} on accuracy at 95 % ({counts})."
    if mc["p"] < alpha:
        return f"{b} does not beat {a}: {a} is better on accuracy at 95 % ({counts})."
    return f"{b} does not beat {a} at 95 %: the difference in accuracy is not significant ({counts})."


def auc_hanley_mcneil(pos: list[float], neg: list[float], z: float = Z95) -> dict:
    """Area under the ROC curve of scores ``pos`` (should be higher) against ``neg`` (Mann-Whitney, ties
    half), with the Hanley-McNeil (1982) 95 % interval: how well a score tells the two groups apart."""
    n1, n2 = len(pos), len(neg)
    if n1 == 0 or n2 == 0:
        raise ValueError("AUC needs scores in both groups")
    a, b = np.asarray(pos, dtype=np.float64)[:, None], np.asarray(neg, dtype=np.float64)[None, :]
    auc = float(((a > b).sum() + 0.5 * (a == b).sum()) / (n1 * n2))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt(max(0.0, auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n2 - 1) * (q2 - auc * auc)) / (n1 * n2))
    return {"auc": _r(auc), "ci95": [_r(max(0.0, auc - z * se)), _r(min(1.0, auc + z * se))], "n_pos": n1, "n_neg": n2}


def mcnemar_items_needed(b: int, c: int, n: int, power: float = 0.8, z: float = Z95) -> int | None:
    """Items a paired test would need to detect the observed difference at 95 % with ``power``
    (Connor 1987's sample size for McNemar's test), from the discordant counts ``b`` (A right, B wrong)
    and ``c`` (A wrong, B right) seen on ``n`` items; None when no difference was observed."""
    if n <= 0 or b == c:
        return None
    p10, p01 = b / n, c / n
    pd, delta = p10 + p01, abs(p01 - p10)
    zb = NormalDist().inv_cdf(power)
    return math.ceil((z * math.sqrt(pd) + zb * math.sqrt(max(0.0, pd - delta * delta))) ** 2 / (delta * delta))


def paired_diff_ci(b: int, c: int, n: int, z: float = Z95) -> list[float]:
    """95 % Wald interval of accuracy(B) - accuracy(A) on ``n`` paired items, from the discordant counts
    ``b`` (A right, B wrong) and ``c`` (A wrong, B right)."""
    if n <= 0:
        return [-1.0, 1.0]
    d = (c - b) / n
    se = math.sqrt(max(0.0, (b + c) / n - d * d) / n)
    return [_r(max(-1.0, d - z * se)), _r(min(1.0, d + z * se))]
