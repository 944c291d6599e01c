"""Normalised statistics to pentagon radii, and the pentagon's area (the score)."""

from __future__ import annotations

import torch

from .settings import _TINY, INVERTED, MODES, SIN72


def radii(
    stats: torch.Tensor, means: torch.Tensor, mode: str = "two_sided"
) -> torch.Tensor:
    """Normalised statistics -> pentagon radii (B, 5); see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"unknown IRS mode {mode!r}; use one of {MODES}")
    means = torch.as_tensor(means, dtype=stats.dtype, device=stats.device)
    inverted = torch.tensor(INVERTED, device=stats.device)
    x = stats.clamp_min(_TINY)
    ratio = torch.where(inverted, means / x, x / means)
    if mode == "paper":
        return ratio
    return torch.exp(
        -torch.log(ratio).abs()
    )  # = min(s, 1/s), smooth enough for autograd


def pentagon_area(r: torch.Tensor) -> torch.Tensor:
    """Area of the pentagon with radii ``r`` (B, 5) at 72 degree spacing."""
    return 0.5 * SIN72 * (r * r.roll(-1, dims=1)).sum(1)


def max_score() -> float:
    """IRS of an image whose statistics equal the reference means (all radii 1)."""
    return 2.5 * SIN72
