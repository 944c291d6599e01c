"""Sample quality without pretrained weights: measures in a local feature space.

* :func:`frechet_distance`: the Fréchet distance of the two sets' feature Gaussians;
* :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al., NeurIPS
  2019): the share of generated images inside the real images' k-NN manifold, and of real
  images inside the generated images' one;
* :func:`classifier_accuracy`: cross-validated accuracy of a logistic regression telling
  real from generated features (0.5: indistinguishable to it; lower is more realistic).

All three are blind to how the samples were optimised, so they can judge a realism loss
that targets other statistics (the IRS). No Inception weights exist offline, so :class:`LocalFeatures` — a randomly initialised conv
net with a fixed seed — stands in for the feature extractor of torchmetrics'
``FrechetInceptionDistance``. Random conv features separate image statistics well enough
to rank sample sets (Naeem et al. 2020 use random embeddings for the same reason), but the
numbers are only comparable within one comparison (same extractor, same reference), never
to published FIDs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LocalFeatures", "local_features", "frechet_distance", "precision_recall", "classifier_accuracy"]


class LocalFeatures(nn.Module):
    """A fixed-seed random conv net: images in [0, 1] -> 256 features (64 channels x 2 x 2)."""

    num_features = 256

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        with torch.no_grad():
            for p in self.net.parameters():  # He-normal weights, zero biases
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / max(1, p[0].numel())) ** 0.5 if p.dim() > 1 else torch.zeros_like(p))
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() * 2 - 1).flatten(1).double()


@torch.no_grad()
def frechet_distance(real: torch.Tensor, fake: torch.Tensor, feature_seed: int = 0) -> float:
    """Fréchet distance between (N, 3, H, W) image sets in [-1, 1], in :class:`LocalFeatures` space."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=LocalFeatures(feature_seed), normalize=True)
    fid.update((real.clamp(-1, 1) + 1) / 2, real=True)
    fid.update((fake.clamp(-1, 1) + 1) / 2, real=False)
    return float(fid.compute())


@torch.no_grad()
def local_features(images: torch.Tensor, feature_seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """(N, 256) float64 :class:`LocalFeatures` of (N, 3, H, W) images in [-1, 1]."""
    net = LocalFeatures(feature_seed)
    x = (images.clamp(-1, 1) + 1) / 2
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # k + 1: the point itself is its own nearest neighbour at 0


def _coverage(support: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Per query: inside the union of the support's k-NN balls (bool)."""
    radii = _kth_neighbour_radii(support, k)
    return (torch.cdist(queries, support) <= radii[None, :]).any(dim=1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, level: float = 0.95) -> dict:
    """Improved precision and recall of (N, D) fake features against (M, D) real features.

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour in the same set. Precision: the share of fakes inside the real manifold
    (realism); recall: the share of reals inside the fake manifold (coverage). Each is a
    share of independent images given the other set, so it carries an exact binomial
    interval conditional on the manifold it is measured against (the manifold's own
    sampling variance is not in it).
    """
    from eidetic.stats import clopper_pearson

    real, fake = real.double(), fake.double()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than k images per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    inside_real = int(_coverage(real, fake, k).sum())
    inside_fake = int(_coverage(fake, real, k).sum())
    n_fake, n_real = fake.shape[0], real.shape[0]
    return {
        "precision": inside_real / n_fake, "precision_ci": list(clopper_pearson(inside_real, n_fake, level)),
        "recall": inside_fake / n_real, "recall_ci": list(clopper_pearson(inside_fake, n_real, level)),
        "n_real": n_real, "n_fake": n_fake, "k": int(k),
    }


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def classifier_accuracy(real: torch.Tensor, fake: torch.Tensor, folds: int = 5, l2: float = 1e-2, steps: int = 200,
                        seed: int = 0, level: float = 0.95) -> dict:
    """Cross-validated accuracy of an L2-regularised logistic regression, real vs fake features.

    The larger set is subsampled (seeded) to the smaller one's size so that 0.5 is chance;
    features are standardised with each training fold's statistics. Every image is predicted
    once, by the fold that did not train on it, so the accuracy is a share of 2n predictions
    with an exact binomial interval (approximate: fold models share training images).
    Near 0.5 the classifier cannot tell the sets apart; near 1 it can.
    """
    from eidetic.stats import clopper_pearson

    g = torch.Generator().manual_seed(int(seed))
    n = min(real.shape[0], fake.shape[0])
    if n < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} images per set, got {n}")
    real = real.double()[torch.randperm(real.shape[0], generator=g)[:n]]
    fake = fake.double()[torch.randperm(fake.shape[0], generator=g)[:n]]
    x = torch.cat([real, fake])
    y = torch.cat([torch.ones(n), torch.zeros(n)]).double()
    # folds stratified by class: fold j holds every folds-th image of each class after a shuffle
    fold = torch.cat([torch.randperm(n, generator=g) % folds, torch.randperm(n, generator=g) % folds])
    correct = 0
    for j in range(folds):
        test = fold == j
        mean, std = x[~test].mean(0), x[~test].std(0).clamp_min(1e-8)
        w, b = _fit_logistic((x[~test] - mean) / std, y[~test], l2, steps)
        pred = ((x[test] - mean) / std) @ w + b > 0
        correct += int((pred == y[test].bool()).sum())
    return {"accuracy": correct / (2 * n), "accuracy_ci": list(clopper_pearson(correct, 2 * n, level)), "n_per_class": n, "folds": int(folds)}
