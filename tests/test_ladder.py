"""Memorization per rung of a duplication ladder (eidetic.ladder): counts against chance, AUC
against single images, copy rates, on cases whose answers are known."""

import numpy as np
import pytest
import torch

from eidetic import ladder
from eidetic.solidmark import chance_probability
from eidetic.stats import poisson_binomial_sf


def _case(seed=0):
    """30 singles and 10 held-out images predicted independently of their keys (the null), and
    10 images x16 predicted exactly (a perfect memorizer of that rung)."""
    g = np.random.default_rng(seed)
    copies = [1] * 30 + [16] * 10 + [1] * 10
    trained = [True] * 40 + [False] * 10
    keys = g.uniform(size=50)
    pred = g.uniform(size=50)
    pred[30:40] = keys[30:40]
    return torch.tensor(pred), torch.tensor(keys), copies, trained


def test_solidmark_by_rung_finds_the_memorized_rung_and_leaves_the_rest_at_chance():
    pred, keys, copies, trained = _case()
    out = ladder.solidmark_by_rung(pred, keys, copies, trained, delta=0.05, n_boot=200)
    assert list(out) == ["x1", "x16", "heldout"]
    assert out["x16"]["eidetic"] == 10 and out["x16"]["median_loss"] == 0.0
    assert out["x16"]["p_value"] < 1e-8 and out["x16"]["auc"] == 1.0 and out["x16"]["tpr_at_0.01_fpr"] == 1.0
    lo, hi = out["x16"]["auc_ci"]
    assert lo == hi == 1.0
    # the null rungs: the count and its exact chance level and p-value, computed independently
    for name, sl in (("x1", slice(0, 30)), ("heldout", slice(40, 50))):
        p, k = pred[sl], keys[sl]
        hits = int(((p - k).abs() < 0.05).sum())
        assert out[name]["n"] == sl.stop - sl.start and out[name]["eidetic"] == hits
        assert out[name]["chance"] == pytest.approx(float(chance_probability(p, 0.05).sum()), abs=1e-3)
        assert out[name]["p_value"] == pytest.approx(poisson_binomial_sf(hits, chance_probability(p, 0.05)))
        assert "auc" not in out[name]


def test_solidmark_by_rung_on_the_null_is_calibrated():
    """Across many draws where no rung is memorized, the repeated rung's AUC averages 0.5 and its
    count's p-value rejects at 5 % about 5 % of the time (at most, for a discrete test)."""
    aucs, rejections = [], 0
    for seed in range(200):
        g = np.random.default_rng(seed)
        pred, keys = torch.tensor(g.uniform(size=60)), torch.tensor(g.uniform(size=60))
        out = ladder.solidmark_by_rung(pred, keys, [1] * 40 + [8] * 20, [True] * 60, delta=0.1, n_boot=0)
        aucs.append(out["x8"]["auc"])
        rejections += out["x8"]["p_value"] < 0.05
    assert abs(np.mean(aucs) - 0.5) < 0.03
    assert rejections / 200 <= 0.08


def test_copy_rates_by_rung_counts_generations_and_memorized_images():
    # x4: own-image copy rates 1, 1/2, 0 over 2 generations each -> 3 of 6; memorized: rate >= 1/2
    own = [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    anyr = [0.0, 0.5, 1.0, 0.5, 0.0, 0.5]
    copies = [1, 1, 4, 4, 4, 1]
    trained = [True, True, True, True, True, False]
    out = ladder.copy_rates_by_rung(own, anyr, copies, trained, generations=2)
    assert list(out) == ["x1", "x4", "heldout"]
    assert out["x4"] == {"n": 3, "copy_rate": 0.5, "ci": pytest.approx(out["x4"]["ci"]), "memorized": 2}
    assert out["x1"]["copy_rate"] == 0.25 and out["x1"]["memorized"] == 1
    assert out["heldout"]["copy_rate"] == 0.5 and "memorized" not in out["heldout"]  # any training image: 1 of its 2
    lo, hi = out["x4"]["ci"]
    assert 0.11 < lo < 0.5 < hi < 0.89  # Clopper-Pearson for 3 of 6
    with pytest.raises(ValueError, match="one entry per caption"):
        ladder.copy_rates_by_rung(own[:3], anyr, copies, trained, generations=2)


def test_evaluation_set_keeps_every_repeated_image_and_samples_the_rest():
    copies = [1] * 100 + [4] * 5 + [16] * 5 + [1] * 40
    trained = [True] * 110 + [False] * 40
    idx = ladder.evaluation_set(copies, trained, singles=20, heldout=10, seed=3)
    assert idx[:10] == list(range(100, 110))  # every repeated image, first
    singles, held = idx[10:30], idx[30:]
    assert len(set(singles)) == 20 and all(i < 100 for i in singles) and singles == sorted(singles)
    assert len(held) == 10 and all(i >= 110 for i in held)
    assert idx == ladder.evaluation_set(copies, trained, singles=20, heldout=10, seed=3)
    assert idx != ladder.evaluation_set(copies, trained, singles=20, heldout=10, seed=4)
    assert len(ladder.evaluation_set(copies, trained, singles=1000, heldout=1000)) == 150  # capped at what there is
