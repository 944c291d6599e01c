"""Diffusion training-loss pieces shared by every training path (over the diffusers scheduler)."""

from __future__ import annotations

import torch

__all__ = ["min_snr_weights", "offset_noise", "diffusion_target"]


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023), as diffusers' training scripts
    compute them: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def offset_noise(shape, offset: float, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """Gaussian noise plus a per-channel constant (Guttenberg 2023's noise offset)."""
    noise = torch.randn(shape, generator=generator).to(device)
    if offset:
        noise = noise + offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator).to(device)
    return noise


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network is trained to predict under the scheduler's ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
