"""SolidMark borders: a solid frame whose grey level is a per-image key.

Scale convention (used everywhere in the project): keys live in [0, 1); image tensors
live in [-1, 1]; a key k is painted into the border as the pixel value ``2k - 1`` on every
channel. Reading a border back (``border_key``) maps the mean border pixel back to the
key scale, so a score is always ``|border_key(canvas) - k|`` with both sides in [0, 1).
Comparing a [0, 1] reading with a [-1, 1] key (or the reverse) is the classic bug this
module exists to prevent.
"""

from __future__ import annotations

import torch

__all__ = [
    "make_keys",
    "key_to_pixel",
    "pixel_to_key",
    "add_border",
    "border_mask",
    "strip_border",
    "border_key",
]


def make_keys(n: int, seed: int) -> torch.Tensor:
    """``n`` keys uniform in [0, 1), reproducible from ``seed`` (float64 on the CPU)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(n, generator=generator, dtype=torch.float64)


def key_to_pixel(keys: torch.Tensor) -> torch.Tensor:
    return keys * 2.0 - 1.0


def pixel_to_key(values: torch.Tensor) -> torch.Tensor:
    return (values + 1.0) / 2.0


def _check_thickness(thickness: int) -> int:
    if int(thickness) != thickness or thickness < 1:
        raise ValueError(f"border thickness must be a positive integer, got {thickness!r}")
    return int(thickness)


def add_border(images: torch.Tensor, keys: torch.Tensor, thickness: int) -> torch.Tensor:
    """Pad ``images`` (B, C, H, W) in [-1, 1] with a solid frame of ``thickness`` pixels.

    Each image's frame has the value of its key (``keys``: shape (B,), in [0, 1)) on every
    channel; the canvas grows to (H + 2t, W + 2t).
    """
    t = _check_thickness(thickness)
    if images.ndim != 4:
        raise ValueError(f"add_border expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    keys = torch.as_tensor(keys, dtype=images.dtype, device=images.device).reshape(-1)
    if keys.numel() != images.shape[0]:
        raise ValueError(f"got {keys.numel()} keys for {images.shape[0]} images")
    if (keys < 0).any() or (keys >= 1).any():
        raise ValueError("keys must lie in [0, 1); pass keys, not border pixel values")
    b, c, h, w = images.shape
    canvas = key_to_pixel(keys).view(b, 1, 1, 1).expand(b, c, h + 2 * t, w + 2 * t).clone()
    canvas[:, :, t : t + h, t : t + w] = images
    return canvas


def border_mask(height: int, width: int, thickness: int, device=None) -> torch.Tensor:
    """Boolean (height, width) mask of a canvas that is True on the border frame."""
    t = _check_thickness(thickness)
    if height <= 2 * t or width <= 2 * t:
        raise ValueError(f"a {height}x{width} canvas has no interior with a {t}px border")
    mask = torch.ones(height, width, dtype=torch.bool, device=device)
    mask[t : height - t, t : width - t] = False
    return mask


def strip_border(canvas: torch.Tensor, thickness: int) -> torch.Tensor:
    t = _check_thickness(thickness)
    return canvas[..., t : canvas.shape[-2] - t, t : canvas.shape[-1] - t]


def border_key(canvas: torch.Tensor, thickness: int) -> torch.Tensor:
    """The key a canvas (B, C, H, W) in [-1, 1] carries: mean border pixel, in key scale."""
    mask = border_mask(canvas.shape[-2], canvas.shape[-1], thickness, device=canvas.device)
    values = canvas[..., mask]  # (B, C, n_border)
    return pixel_to_key(values.flatten(1).mean(dim=1))
