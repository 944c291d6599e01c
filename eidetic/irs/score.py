"""The exact score, its differentiable surrogate, and the realism loss."""

from __future__ import annotations

import torch

from .kernels import image_statistics
from .pentagon import max_score, pentagon_area, radii
from .reference import IRSReference, default_reference
from .surrogate import soft_image_statistics


def _reference(reference: IRSReference | None, images: torch.Tensor) -> IRSReference:
    if reference is None:
        return default_reference(tuple(images.shape[-2:]))
    if not isinstance(reference, IRSReference):
        raise TypeError(
            f"reference must be an IRSReference (or None for the built-in one), got {type(reference).__name__}"
        )
    return reference


def image_realism_score(
    images: torch.Tensor, reference: IRSReference | None = None
) -> torch.Tensor:
    """Exact IRS of every image in a (B, 3, H, W) batch in [-1, 1] -> (B,) (higher = more real).

    ``reference=None`` uses the built-in reference fitted at the images' resolution.
    """
    ref = _reference(reference, images)
    stats = image_statistics(images, ref.settings)
    return pentagon_area(radii(stats, ref.means, ref.mode))


def soft_image_realism_score(
    images: torch.Tensor, reference: IRSReference | None = None
) -> torch.Tensor:
    """Differentiable surrogate of ``image_realism_score`` (uses ``reference.soft_means``)."""
    ref = _reference(reference, images)
    stats = soft_image_statistics(images, ref.settings)
    return pentagon_area(radii(stats, ref.soft_means, ref.mode))


def realism_loss(
    images: torch.Tensor, reference: IRSReference | None = None
) -> torch.Tensor:
    """Scalar loss ``1 - mean(soft IRS) / max IRS``: 0 when every image matches the
    reference statistics, up to 1 (two-sided mode). Differentiable w.r.t. ``images``."""
    return 1.0 - soft_image_realism_score(images, reference).mean() / max_score()
