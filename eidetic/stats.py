"""Statistics every reported figure goes through: rank AUC, TPR at low FPR, intervals, tests.

One AUC for the whole project: :func:`rank_auc`, the Mann-Whitney statistic (ties count
half). It is invariant to any monotone transform of the scores, so it is right for unbounded
scores (denoising confidence, noise-prediction norms, clique sizes); torchmetrics'
``binary_auroc`` is not (it squashes scores outside [0, 1] through a sigmoid, and in float32
every score above ~16.6 becomes 1.0 and ties).

Every AUC is reported with :func:`tpr_at_fpr` (TPR at 1 % FPR, as the detection papers do)
and a stratified bootstrap interval (:func:`auc_report`); counts get exact binomial
(Clopper-Pearson) intervals; per-image decisions across many images use
Benjamini-Hochberg false-discovery control.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "rank_auc", "tpr_at_fpr", "auc_p_value", "bootstrap_interval", "auc_report", "clopper_pearson",
    "poisson_binomial_sf", "poisson_binomial_pmf", "poisson_binomial_interval", "roc_curve", "benjamini_hochberg", "spearman",
    "mean_and_standard_error", "stratified_difference", "t_interval",
]


def _as_arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(torch.as_tensor(scores).detach().cpu().double().reshape(-1).numpy(), dtype=np.float64)
    y = np.asarray(torch.as_tensor(labels).detach().cpu().reshape(-1).numpy()).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"got {s.size} scores for {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: a detector failed on some inputs")
    return s, y


def rank_auc(scores, labels) -> float | None:
    """P(score of a positive > score of a negative) + ½ P(tie); None when a class is empty."""
    from scipy.stats import rankdata

    s, y = _as_arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # average ranks: ties count half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores, labels, fpr: float = 0.01) -> float | None:
    """The largest TPR whose threshold flags at most ``fpr`` of the negatives (strictly above it).

    With fewer than 1/fpr negatives no negative may be flagged, so the threshold is the
    highest negative score: the fraction of positives scoring above every negative.
    """
    s, y = _as_arrays(scores, labels)
    pos, neg = s[y], np.sort(s[~y])[::-1]
    if pos.size == 0 or neg.size == 0:
        return None
    allowed = int(math.floor(fpr * neg.size + 1e-9))
    threshold = neg[allowed] if allowed < neg.size else -np.inf
    return float((pos > threshold).mean())


def auc_p_value(scores, labels) -> float | None:
    """One-sided Mann-Whitney p-value for "positives score higher than negatives"."""
    from scipy.stats import mannwhitneyu

    s, y = _as_arrays(scores, labels)
    if y.sum() == 0 or (~y).sum() == 0:
        return None
    return float(mannwhitneyu(s[y], s[~y], alternative="greater").pvalue)


def bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], float | None], scores, labels,
                       n: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(scores, labels)`` over a bootstrap stratified by label
    (positives and negatives resampled separately, so every resample has both classes)."""
    s, y = _as_arrays(scores, labels)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if pos.size == 0 or neg.size == 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n)):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        v = statistic(s[idx], y[idx])
        if v is not None:
            values.append(v)
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def auc_report(scores, labels, fpr: float = 0.01, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC with its bootstrap interval and one-sided p-value, TPR at ``fpr`` with its interval,
    and the class sizes: everything a reported AUC needs beside it."""
    s, y = _as_arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out = {"auc": rank_auc(s, y), "auc_ci": None, "auc_p_value": auc_p_value(s, y), f"tpr_at_{fpr:g}_fpr": tpr_at_fpr(s, y, fpr),
           f"tpr_at_{fpr:g}_fpr_ci": None, "n_positive": n_pos, "n_negative": n_neg}
    if n_pos and n_neg and n_boot:
        out["auc_ci"] = list(bootstrap_interval(rank_auc, s, y, n_boot, seed=seed))
        out[f"tpr_at_{fpr:g}_fpr_ci"] = list(bootstrap_interval(lambda a, b: tpr_at_fpr(a, b, fpr), s, y, n_boot, seed=seed + 1))
    return out


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for a proportion."""
    from scipy.stats import beta

    if trials <= 0:
        return (0.0, 1.0)
    a = (1 - level) / 2
    lo = 0.0 if successes == 0 else float(beta.ppf(a, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - a, successes + 1, trials - successes))
    return lo, hi


def poisson_binomial_pmf(probabilities) -> np.ndarray:
    """P(X = k), k = 0..n, for X a sum of independent Bernoulli(p_i) (dynamic programming)."""
    p = np.asarray(torch.as_tensor(probabilities, dtype=torch.float64).reshape(-1).cpu().numpy(), dtype=np.float64)
    dist = np.zeros(p.size + 1)
    dist[0] = 1.0
    for k, pk in enumerate(p, start=1):
        dist[1 : k + 1] = dist[1 : k + 1] * (1 - pk) + dist[0:k] * pk
        dist[0] *= 1 - pk
    return dist


def poisson_binomial_sf(observed: int, probabilities) -> float:
    """Exact P(X >= observed) for X a sum of independent Bernoulli(p_i)."""
    dist = poisson_binomial_pmf(probabilities)
    if observed <= 0:
        return 1.0
    if observed >= dist.size:
        return 0.0
    return float(min(1.0, max(0.0, dist[observed:].sum())))


def poisson_binomial_interval(probabilities, level: float = 0.95) -> tuple[int, int]:
    """The central ``level`` range [lo, hi] of a Poisson-binomial count: where a count of
    predictions that ignore their keys falls (the chance band of a memorization curve)."""
    cdf = np.cumsum(poisson_binomial_pmf(probabilities))
    a = (1 - level) / 2
    lo = int(np.searchsorted(cdf, a - 1e-12))
    hi = int(np.searchsorted(cdf, 1 - a - 1e-12))
    return lo, min(hi, cdf.size - 1)


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray] | None:
    """(false-positive rates, true-positive rates) over every threshold, from (0, 0) to (1, 1);
    tied scores move both rates at once. None when a class is empty."""
    s, y = _as_arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def benjamini_hochberg(p_values, q: float = 0.1) -> np.ndarray:
    """Boolean mask of the hypotheses rejected at false-discovery rate ``q`` (Benjamini & Hochberg 1995)."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return np.zeros(0, dtype=bool)
    if not 0 < q < 1:
        raise ValueError(f"the false-discovery rate q must be in (0, 1), got {q}")
    order = np.argsort(p, kind="stable")
    below = p[order] <= q * np.arange(1, p.size + 1) / p.size
    rejected = np.zeros(p.size, dtype=bool)
    if below.any():
        rejected[order[: int(np.flatnonzero(below).max()) + 1]] = True
    return rejected


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (None for fewer than 3 pairs or a constant input)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(spearmanr(a, b).statistic)


def mean_and_standard_error(values: Sequence[float]) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None)


def t_interval(mean: float | None, standard_error: float | None, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of a mean of ``n`` values from its standard error (None without two values)."""
    from scipy.stats import t as student_t

    if mean is None or standard_error is None or n < 2 or not math.isfinite(standard_error):
        return None
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * standard_error
    return mean - half, mean + half


def stratified_difference(a: Sequence[float], b: Sequence[float], variance_a: Sequence[float], variance_b: Sequence[float],
                          level: float = 0.95) -> tuple[float, float, float]:
    """Mean over strata (e.g. training seeds) of a - b, with a normal interval from each
    estimate's own sampling variance (a proportion's p(1-p)/n, a mean's sd²/n).

    The two sets of a stratum are treated as independent, which overstates the variance when
    they are paired (same seed, captions and sampling noise): the interval is conservative.
    Variation between strata beyond that sampling variance is not in it, so read the
    per-stratum differences beside it.
    """
    from scipy.stats import norm

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = np.asarray(variance_a, dtype=np.float64), np.asarray(variance_b, dtype=np.float64)
    if not (a.size == b.size == va.size == vb.size) or a.size == 0:
        raise ValueError(f"need one a, b and variance of each per stratum, got {a.size}, {b.size}, {va.size}, {vb.size}")
    delta = float((a - b).mean())
    half = float(norm.ppf(0.5 + level / 2) * math.sqrt((va + vb).sum()) / a.size)
    return delta, delta - half, delta + half
