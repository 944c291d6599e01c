"""Memorization per rung of a duplication ladder, against both kinds of ground truth.

A data set with a duplication ladder (``data.duplicate.ladder``: groups of training images
repeated x4, x16, ...) knows which images a model had most reason to memorize. Two
summaries of a trained model per rung, each beside what chance or the single images give:

* :func:`solidmark_by_rung`: SolidMark's eidetic count at δ against its exact chance level
  and Poisson-binomial p-value, the median ℓ, and for every repeated rung the rank AUC of
  −ℓ against the single images (bootstrap interval, TPR at 1 % FPR);
* :func:`copy_rates_by_rung`: what full generations reproduce (labels from
  :func:`eidetic.extraction.generation_ground_truth`, independent of every detector): the
  fraction of a rung's generations that copy the caption's own training image, with a
  Clopper-Pearson interval, and how many images are copied in at least half of theirs.
  Held-out captions have no image of their own: theirs is the rate of copying any
  training image.

Rungs are named ``x<copies>`` (``x1``: single images) and ``heldout``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .solidmark import chance_probability, eidetic_scores
from .stats import auc_report, clopper_pearson, poisson_binomial_sf

__all__ = ["rung_names", "evaluation_set", "solidmark_by_rung", "copy_rates_by_rung"]


def rung_names(copies: Sequence[int], trained: Sequence[bool]) -> list[str]:
    """Each image's rung: ``x<copies>`` for trained images, ``heldout`` for the rest."""
    return [f"x{int(c)}" if t else "heldout" for c, t in zip(copies, trained)]


def evaluation_set(copies: Sequence[int], trained: Sequence[bool], singles: int, heldout: int, seed: int = 0) -> list[int]:
    """Positions of every repeated training image, then a seeded sample of ``singles`` single
    training images and of ``heldout`` held-out images (each in index order)."""
    import random

    rng = random.Random(seed)
    repeated = [i for i, (c, t) in enumerate(zip(copies, trained)) if t and c > 1]
    single = [i for i, (c, t) in enumerate(zip(copies, trained)) if t and c == 1]
    held = [i for i, t in enumerate(trained) if not t]
    return repeated + sorted(rng.sample(single, min(singles, len(single)))) + sorted(rng.sample(held, min(heldout, len(held))))


def _order(names: set[str]) -> list[str]:
    return sorted((n for n in names if n != "heldout"), key=lambda n: int(n[1:])) + (["heldout"] if "heldout" in names else [])


def solidmark_by_rung(pred_keys, keys, copies: Sequence[int], trained: Sequence[bool], delta: float,
                      n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per rung: ``n``, ``eidetic`` (ℓ < δ), ``chance``, ``p_value``, ``median_loss``; repeated
    rungs also ``auc`` of −ℓ vs the single images with ``auc_ci`` and ``tpr_at_0.01_fpr``."""
    pred = torch.as_tensor(pred_keys, dtype=torch.float64).reshape(-1)
    loss = eidetic_scores(pred, keys)
    names = np.array(rung_names(copies, trained))
    if names.size != loss.numel():
        raise ValueError(f"got {loss.numel()} scores for {names.size} images")
    single = names == "x1"
    out: dict[str, dict] = {}
    for name in _order(set(names.tolist())):
        m = names == name
        mt = torch.from_numpy(m)
        probs = chance_probability(pred[mt], delta)
        hits = int((loss[mt] < delta).sum())
        entry = {"n": int(m.sum()), "eidetic": hits, "chance": round(float(probs.sum()), 3),
                 "p_value": poisson_binomial_sf(hits, probs), "median_loss": round(float(loss[mt].median()), 4)}
        if name not in ("x1", "heldout") and single.any():
            both = m | single
            rep = auc_report(-loss.numpy()[both], m[both], n_boot=n_boot, seed=seed)
            entry.update(auc=rep["auc"], auc_ci=rep["auc_ci"], **{"tpr_at_0.01_fpr": rep["tpr_at_0.01_fpr"]})
        out[name] = entry
    return out


def copy_rates_by_rung(own_rate, any_rate, copies: Sequence[int], trained: Sequence[bool], generations: int) -> dict[str, dict]:
    """Per rung: ``copy_rate`` (generations copying the caption's own image; held-out: any
    training image) with its Clopper-Pearson ``ci`` over ``generations`` per caption, ``n``
    captions and ``memorized`` (captions copying their own image in at least half of their
    generations)."""
    own = torch.as_tensor(own_rate, dtype=torch.float64).reshape(-1)
    anyr = torch.as_tensor(any_rate, dtype=torch.float64).reshape(-1)
    names = np.array(rung_names(copies, trained))
    if not (names.size == own.numel() == anyr.numel()):
        raise ValueError("own_rate, any_rate, copies and trained need one entry per caption")
    out: dict[str, dict] = {}
    for name in _order(set(names.tolist())):
        mt = torch.from_numpy(names == name)
        rate = anyr[mt] if name == "heldout" else own[mt]
        k, n = int(round(float(rate.sum()) * generations)), int(mt.sum()) * int(generations)
        entry = {"n": int(mt.sum()), "copy_rate": round(k / n, 4), "ci": [round(v, 4) for v in clopper_pearson(k, n)]}
        if name != "heldout":
            entry["memorized"] = int((rate >= 0.5).sum())
        out[name] = entry
    return out
