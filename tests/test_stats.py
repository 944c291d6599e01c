"""The project's one AUC and the intervals beside every figure."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from eidetic.stats import (
    auc_p_value, auc_report, benjamini_hochberg, bootstrap_interval, clopper_pearson, poisson_binomial_sf, rank_auc,
    spearman, tpr_at_fpr,
)


def test_rank_auc_on_scores_in_the_hundreds_where_the_logit_auroc_ties():
    """torchmetrics' binary_auroc squashes scores outside [0, 1] through a sigmoid: in float32
    every score above ~16.6 becomes 1.0, so these perfectly ordered scores tie there."""
    scores = torch.tensor([120.0, 150.0, 200.0, 310.0, 400.0, 500.0])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    assert rank_auc(scores, labels) == pytest.approx(8 / 9)
    assert float(binary_auroc(scores, labels)) == pytest.approx(0.5)  # the bug this helper exists for
    assert rank_auc(scores / 1000, labels) == rank_auc(scores, labels) == rank_auc(torch.log(scores), labels)


def test_rank_auc_ties_count_half_and_empty_classes_are_undefined():
    assert rank_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert rank_auc([0.1, 0.9, 0.5], [0, 1, 1]) == 1.0
    assert rank_auc([0.1, 0.2], [1, 1]) is None and rank_auc([0.1, 0.2], [0, 0]) is None
    with pytest.raises(ValueError, match="NaN"):
        rank_auc([float("nan"), 1.0], [0, 1])


def test_rank_auc_matches_the_mann_whitney_probability():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 70)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert rank_auc(np.r_[pos, neg], np.r_[np.ones(50), np.zeros(70)]) == pytest.approx(brute)


def test_tpr_at_low_fpr():
    # 200 negatives: 1 % may be flagged, so the threshold is the 3rd-highest negative
    neg = np.arange(200, dtype=float)
    pos = np.array([197.5, 198.5, 300.0, 10.0])
    scores, labels = np.r_[pos, neg], np.r_[np.ones(4), np.zeros(200)]
    assert tpr_at_fpr(scores, labels, 0.01) == pytest.approx(3 / 4)  # above 197 (flags 198, 199)
    assert tpr_at_fpr(scores, labels, 0.0) == pytest.approx(1 / 4)  # above every negative
    assert tpr_at_fpr([0.9, 0.1], [1, 0], 0.01) == 1.0  # under 100 negatives: none may be flagged


def test_auc_report_intervals_cover_the_truth_and_a_null_sits_at_chance():
    rng = np.random.default_rng(1)
    null = auc_report(rng.normal(size=300), rng.random(300) < 0.3, n_boot=300)
    assert null["auc_ci"][0] < 0.5 < null["auc_ci"][1] and null["auc_p_value"] > 0.01
    strong = auc_report(np.r_[rng.normal(3, 1, 40), rng.normal(0, 1, 200)], np.r_[np.ones(40), np.zeros(200)], n_boot=300)
    assert strong["auc_ci"][0] > 0.9 and strong["auc_p_value"] < 1e-10 and strong["n_positive"] == 40
    assert auc_p_value([0.5, 0.5], [1, 1]) is None


def test_bootstrap_interval_is_seeded():
    s, y = np.arange(20.0), np.arange(20) % 2
    assert bootstrap_interval(rank_auc, s, y, n=100, seed=3) == bootstrap_interval(rank_auc, s, y, n=100, seed=3)


def test_clopper_pearson():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(5, 10)
    assert lo < 0.5 < hi and lo == pytest.approx(1 - hi)


def test_poisson_binomial_tail_matches_the_binomial():
    from scipy import stats

    assert poisson_binomial_sf(3, [0.2] * 10) == pytest.approx(stats.binom.sf(2, 10, 0.2))
    assert poisson_binomial_sf(0, [0.5]) == 1.0 and poisson_binomial_sf(2, [0.5]) == 0.0


def test_benjamini_hochberg_controls_false_discoveries():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True] + [False] * 8
    rng = np.random.default_rng(0)
    rejected = [benjamini_hochberg(rng.random(100), 0.1).any() for _ in range(400)]
    assert np.mean(rejected) < 0.1 + 3 * math.sqrt(0.1 * 0.9 / 400)  # global null: P(any) <= q


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_stratified_difference_averages_strata_and_pools_their_variances():
    from eidetic.stats import stratified_difference

    delta, lo, hi = stratified_difference([0.9, 0.7], [0.5, 0.5], [0.01, 0.01], [0.01, 0.01])
    assert delta == pytest.approx(0.3) and (hi - lo) / 2 == pytest.approx(1.959964 * (0.04 ** 0.5) / 2, rel=1e-5)
    assert lo > 0  # excludes zero: a difference
    _, lo, hi = stratified_difference([0.6], [0.5], [0.01], [0.01])
    assert lo < 0 < hi  # one stratum, same variances: the interval straddles zero
    with pytest.raises(ValueError, match="per stratum"):
        stratified_difference([0.1, 0.2], [0.1], [0.01], [0.01])
