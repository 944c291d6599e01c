"""Sample-quality measures in the local feature space: improved precision/recall and the
real-vs-generated classifier, on sets whose answer is known, and the unseen reference crops."""

import pytest
import torch

from eidetic.quality import classifier_accuracy, local_features, precision_recall
from lightning_modules.data import DataError, _builtin_draws, _overlaps, _unseen_boxes, builtin_unseen_crops


def _gauss(n, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).double()


def _images(crops):
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_precision_recall_of_a_resample_is_one_and_of_a_shifted_set_zero():
    real = _gauss(200)
    resample = real[torch.randint(0, 200, (200,), generator=torch.Generator().manual_seed(1))]
    same = precision_recall(real, resample)
    assert same["precision"] == 1.0 and same["recall"] > 0.8 and same["precision_ci"][0] > 0.95
    assert same["n_real"] == same["n_fake"] == 200 and same["k"] == 3
    far = precision_recall(real, real + 10)
    assert far["precision"] == 0.0 and far["recall"] == 0.0 and far["precision_ci"][1] < 0.05


def test_precision_recall_separate_realism_from_coverage():
    real = _gauss(300)
    collapsed = real[:10].repeat(30, 1)  # every fake a real image, a few of them: precise, no coverage
    pr = precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.3
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(real, real[:3])


def test_classifier_is_at_chance_on_one_distribution_and_certain_on_two():
    same = classifier_accuracy(_gauss(200, seed=0), _gauss(200, seed=1))
    assert same["accuracy_ci"][0] <= 0.5 <= same["accuracy_ci"][1] and same["n_per_class"] == 200 and same["folds"] == 5
    shifted = classifier_accuracy(_gauss(200, seed=0), _gauss(300, seed=1) + 2)
    assert shifted["accuracy"] > 0.95 and shifted["n_per_class"] == 200  # larger set subsampled: 0.5 stays chance
    assert shifted["accuracy_ci"][0] > 0.9


def test_on_images_photos_pass_and_noise_fails():
    real = local_features(_images(builtin_unseen_crops(96, 32, 16, 0.25, 0)))
    other = local_features(_images(builtin_unseen_crops(96, 32 + 96, 16, 0.25, 0, draw_seed=2)))
    noise = local_features(torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(0)).sign())
    photos, fake = precision_recall(real, other), precision_recall(real, noise)
    assert photos["precision"] > 0.7 and photos["recall"] > 0.7
    assert fake["precision"] < 0.1 and fake["recall"] < 0.1
    assert classifier_accuracy(real, other)["accuracy"] < 0.62
    assert classifier_accuracy(real, noise)["accuracy"] > 0.95


def test_unseen_crops_overlap_no_data_set_crop_nor_each_other():
    draws = list(_builtin_draws(32, 16, 0.25, 0))
    boxes = _unseen_boxes(128, 32, 16, 0.25, 0, draw_seed=1)
    for i, (name, box) in enumerate(boxes):
        assert not any(_overlaps(box, b) for _, n, b, _ in draws if n == name)
        assert not any(_overlaps(box, b) for n, b in boxes[:i] if n == name)
    assert _overlaps((0, 0, 10), (9, 9, 5)) and not _overlaps((0, 0, 10), (10, 0, 5))
    assert builtin_unseen_crops(4, 32, 16, 0.25, 0).shape == (4, 16, 16, 3)
    with pytest.raises(DataError, match="no room"):
        _unseen_boxes(16 * 400, 32, 16, 0.25, 0, draw_seed=1, max_tries=50)
