"""A differentiable surrogate of the five statistics, for the realism loss."""

from __future__ import annotations

import torch

from .kernels import (
    _glcm_offsets,
    _pairs,
    _smooth,
    _sobel,
    fft_magnitude,
    laplacian_variance,
    paper_scales,
    to_grayscale,
)
from .settings import IRSSettings


def _soft_levels(gray: torch.Tensor, levels: int) -> torch.Tensor:
    """Triangular soft histogram weights (B, H, W, L): each pixel splits its unit mass
    between the two nearest bin centres (k + 0.5) / L, linearly."""
    u = (gray * levels - 0.5).clamp(0, levels - 1)
    centres = torch.arange(levels, dtype=gray.dtype, device=gray.device)
    return torch.relu(1.0 - (u.unsqueeze(-1) - centres).abs())


def soft_image_statistics(
    images: torch.Tensor, settings: IRSSettings | None = None
) -> torch.Tensor:
    """Differentiable stand-ins for the five statistics, (B, 5), finite gradients everywhere.

    * edges: mean of sigmoid((|Sobel(smoothed)| - c) / width), c the midpoint of the
      Canny thresholds; no thinning (non-maximum suppression has no useful gradient);
    * GLCM: the same co-occurrence statistics computed from triangular soft histograms,
      so every pixel pair contributes a 2x2 patch of soft counts;
    * Laplacian variance: exact (already differentiable);
    * FFT: sqrt(|F|^2 + eps^2) instead of |F|, finite gradient at zero.
    The surrogate has its own reference means (``IRSReference.soft_means``), so its
    scale differences from the exact statistics cancel in the normalisation.
    """
    s = settings or IRSSettings()
    # the paper's uint8 rounding has no gradient: the surrogate uses the continuous luma
    gray = to_grayscale(images)
    h, w = gray.shape[-2:]
    lap_scale, fft_scale = paper_scales(s, h, w)
    isobel, jsobel = _sobel(_smooth(gray, s.canny_sigma))
    mag = torch.sqrt(isobel * isobel + jsobel * jsobel + 1e-12)
    centre = 0.5 * (s.canny_low + s.canny_high)
    edges = torch.sigmoid((mag - centre) / s.soft_edge_width).flatten(1).mean(1)

    L = s.glcm_levels
    soft = _soft_levels(gray, L)  # (B, H, W, L)
    levels = torch.arange(L, dtype=gray.dtype, device=gray.device)
    sq_dist = (levels.view(-1, 1) - levels.view(1, -1)) ** 2
    contrast = torch.zeros(gray.shape[0], dtype=gray.dtype, device=gray.device)
    energy = torch.zeros_like(contrast)
    offsets = _glcm_offsets(s.glcm_distance, s.glcm_angles)
    for di, dj in offsets:
        a, c = _pairs(soft.movedim(-1, 1), di, dj)  # (B, L, h', w')
        a, c = a.flatten(2), c.flatten(2)
        glcm = torch.bmm(a, c.transpose(1, 2))  # (B, L, L) soft counts
        glcm = glcm + glcm.transpose(1, 2)
        p = glcm / glcm.sum(dim=(1, 2), keepdim=True)
        asm = (p * p).sum(dim=(1, 2))
        energy = energy + (asm if s.glcm_energy == "asm" else torch.sqrt(asm))
        contrast = contrast + (p * sq_dist).sum(dim=(1, 2))
    contrast, energy = contrast / len(offsets), energy / len(offsets)
    return torch.stack(
        [
            edges,
            contrast,
            energy,
            laplacian_variance(gray) * lap_scale,
            fft_magnitude(gray, eps=1e-4, dc=s.fft_dc) * fft_scale,
        ],
        dim=1,
    )
