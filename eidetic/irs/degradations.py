"""Degraded copies of real images: negatives for tests, thresholds and benchmarks."""

from __future__ import annotations

import numpy as np
import torch

from .kernels import _gaussian_kernel1d, _separable

DEGRADATIONS = ("blur", "noise", "jpeg", "flatten")


def degrade(
    images: torch.Tensor, kind: str, strength: float | None = None, seed: int = 0
) -> torch.Tensor:
    """Degraded copies of (B, 3, H, W) images in [-1, 1].

    blur: Gaussian, sigma = strength px (default 1.5); noise: additive Gaussian, std =
    strength on the [-1, 1] scale (default 0.2); jpeg: PIL JPEG round trip in memory at
    quality = strength (default 10); flatten: contrast shrunk toward each image's mean by
    the factor strength (default 0.3).
    """
    if kind == "blur":
        sigma = 1.5 if strength is None else float(strength)
        k = _gaussian_kernel1d(sigma, images.dtype, images.device)
        b, c, h, w = images.shape
        flat = images.reshape(b * c, h, w)
        return _separable(flat, k, k, "replicate").reshape(b, c, h, w)
    if kind == "noise":
        std = 0.2 if strength is None else float(strength)
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(images.shape, generator=g, dtype=images.dtype).to(
            images.device
        )
        return (images + std * noise).clamp(-1, 1)
    if kind == "jpeg":
        import io

        from PIL import Image

        quality = 10 if strength is None else int(strength)
        out = []
        for img in images:
            arr = (
                ((img.detach().cpu().clamp(-1, 1) + 1) * 127.5)
                .round()
                .byte()
                .permute(1, 2, 0)
                .numpy()
            )
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
            buf.seek(0)
            back = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32)
            out.append(torch.from_numpy(back).permute(2, 0, 1) / 127.5 - 1)
        return torch.stack(out).to(images.device, images.dtype)
    if kind == "flatten":
        factor = 0.3 if strength is None else float(strength)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        return mean + factor * (images - mean)
    raise ValueError(f"unknown degradation {kind!r}; use one of {DEGRADATIONS}")
