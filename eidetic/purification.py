"""Cheap purifications a mimic may apply to protected images before using them.

Hönig et al. (ICLR 2025) and GrIDPure (CVPR 2024) show that Glaze, Mist and Anti-DreamBooth
are circumvented by simple preprocessing; a protection result is only meaningful beside the
same result after these purifications:

==================  =========================================================================
``jpeg``            JPEG compression at ``quality`` (PIL, 4:2:0 chroma subsampling)
``gaussian``        additive Gaussian noise, standard deviation ``sigma`` of the [0, 1] range
``noisy_upscale``   downscale by ``factor`` (bicubic, antialiased), add Gaussian noise
                    ``sigma``, upscale back (bicubic): Hönig's "noisy upscaling" with a
                    bicubic stand-in for their learned upscaler
``diffpure``        DiffPure with the target model: encode, noise to timestep ``t_star``
                    with the scheduler's own ``add_noise``, denoise back with DDIM
                    (unconditional), decode
==================  =========================================================================

Every function takes and returns (B, 3, H, W) images in [-1, 1], keeps the size, and returns
images on 8-bit levels (what a mimic saves and trains on). Randomness comes only from the
``generator`` argument: the same seed gives bitwise the same output.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch
import torch.nn.functional as F

from eidetic.protection import _pad_to_multiple, from_levels, to_levels

__all__ = ["PURIFICATIONS", "jpeg", "gaussian_noise", "noisy_upscale", "diffpure", "purify", "quantise"]

PURIFICATIONS = ("jpeg", "gaussian", "noisy_upscale", "diffpure")


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Clip to [-1, 1] and round to 8-bit levels."""
    return from_levels(to_levels(images))


def _check(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG round trip through PIL at ``quality`` (1..95). Deterministic."""
    import numpy as np
    from PIL import Image

    _check(images)
    if not 1 <= int(quality) <= 95:
        raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
    levels = to_levels(images.detach().cpu()).to(torch.uint8)
    out = []
    for img in levels:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return (torch.stack(out).float() / 127.5 - 1).to(images.device)


def _noise(shape, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    # sigma is a fraction of the [0, 1] range; images live in [-1, 1], twice as wide
    return torch.randn(shape, generator=generator) * (2.0 * float(sigma))


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """images + N(0, sigma^2) on the [0, 1] scale, clipped and rounded to 8-bit levels."""
    _check(images)
    if not 0 <= sigma <= 1:
        raise ValueError(f"noise sigma must be in [0, 1] (a fraction of the pixel range), got {sigma}")
    noisy = images.detach().float().cpu() + _noise(images.shape, sigma, generator)
    return quantise(noisy).to(images.device)


def noisy_upscale(images: torch.Tensor, sigma: float, factor: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Downscale by ``factor``, add noise ``sigma`` at the low resolution, upscale back (bicubic)."""
    _check(images)
    if not 0 <= sigma <= 1:
        raise ValueError(f"noise sigma must be in [0, 1] (a fraction of the pixel range), got {sigma}")
    if int(factor) < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor}")
    x = images.detach().float().cpu()
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h / factor)), max(1, round(w / factor))), mode="bicubic", align_corners=False, antialias=True)
    small = small + _noise(small.shape, sigma, generator)
    up = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return quantise(up).to(images.device)


@torch.no_grad()
def diffpure(
    model,
    images: torch.Tensor,
    t_star: int,
    steps: int = 10,
    captions: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiffPure (Nie et al. 2022) with ``model`` itself: forward-noise E(x) to ``t_star``, denoise.

    The noising is the training scheduler's ``add_noise`` at ``t_star``; the reverse process is
    deterministic DDIM over ``steps`` timesteps evenly spaced from ``t_star`` down to 0,
    conditioned on ``captions`` (default: the empty caption, the unconditional model; a mimic
    purifying images need not know their captions). ``t_star = 0`` returns the images
    unchanged (nothing is noised, so nothing is purified).
    """
    _check(images)
    n_t = model.num_train_timesteps
    if not 0 <= int(t_star) < n_t:
        raise ValueError(f"t_star must be in [0, {n_t - 1}] (the model's training timesteps), got {t_star}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if int(t_star) == 0:
        return quantise(images)
    device = model.device
    b, _, h, w = images.shape
    z0 = model.encode_images(_pad_to_multiple(images.to(device).float(), model.downsample))
    noise = torch.randn(z0.shape, generator=generator).to(device)
    t0 = int(t_star)
    z = model.add_noise(z0, noise, torch.full((b,), t0, device=device))
    cond = model.encode_prompt(list(captions) if captions is not None else [""] * b)
    if cond.shape[0] != b:
        raise ValueError(f"need one caption per image: {cond.shape[0]} captions for {b} images")
    grid = torch.linspace(t0, 0, int(steps) + 1).round().long().tolist()
    timesteps = sorted({t for t in grid[:-1] if t > 0} | {t0}, reverse=True)
    abar = model.alphas_cumprod.to(device).float()
    for i, t in enumerate(timesteps):
        tt = torch.full((b,), t, device=device)
        eps = model.predict_noise(z, tt, cond).float()
        x0 = model.predict_x0(z.float(), tt, eps)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        if prev is None:
            z = x0
        else:
            a = abar[prev]
            z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return quantise(model.decode_latents(z.to(model.dtype)).float()[..., :h, :w]).to(images.device)


def purify(kind: str, images: torch.Tensor, *, quality: int = 75, sigma: float = 0.05, factor: int = 2, t_star: int = 100,
           steps: int = 10, model=None, captions: Sequence[str] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dispatch one named purification (see the module table) with its settings."""
    if kind == "jpeg":
        return jpeg(images, quality)
    if kind == "gaussian":
        return gaussian_noise(images, sigma, generator)
    if kind == "noisy_upscale":
        return noisy_upscale(images, sigma, factor, generator)
    if kind == "diffpure":
        if model is None:
            raise ValueError("diffpure needs the model")
        return diffpure(model, images, t_star, steps, captions, generator)
    raise ValueError(f"unknown purification {kind!r}; choose one of {', '.join(PURIFICATIONS)}")
