"""Sample quality without pretrained weights: a Fréchet distance in a local feature space.

No Inception weights exist offline, so :class:`LocalFeatures` — a randomly initialised conv
net with a fixed seed — stands in for the feature extractor of torchmetrics'
``FrechetInceptionDistance``. Random conv features separate image statistics well enough
to rank sample sets (Naeem et al. 2020 use random embeddings for the same reason), but the
numbers are only comparable within one comparison (same extractor, same reference), never
to published FIDs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LocalFeatures", "frechet_distance"]


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
