"""Diffusion training-loss pieces shared by every training path."""

from __future__ import annotations

import torch

__all__ = ["snr", "min_snr_weights", "offset_noise", "diffusion_target"]


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps.long()].float()
    return a / (1 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023).

    For epsilon prediction the weight is min(SNR, gamma) / SNR; for v prediction it is
    min(SNR, gamma) / (SNR + 1), as in diffusers' training scripts.
    """
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, float(gamma)))
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def offset_noise(shape, offset: float, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """Gaussian noise plus a per-channel constant (Guttenberg 2023's noise offset)."""
    noise = torch.randn(shape, generator=generator).to(device)
    if offset:
        noise = noise + offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator).to(device)
    return noise


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    a = alphas_cumprod.to(x0.device)[timesteps.long()].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
