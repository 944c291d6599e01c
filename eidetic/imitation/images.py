"""Images for the imitation audit: loading, cropping, and the array/tensor conventions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from eidetic.errors import InputError
from eidetic.images import decode_image
from eidetic.photos import ALIASES, PHOTOS, load_photo


class ImitationError(InputError):
    """Input the imitation audit cannot use: says what was wrong and how to fix it."""


def load_image(spec: str | Path) -> np.ndarray:
    """A built-in photograph by name (``astronaut``, see :mod:`eidetic.photos`) or an image file
    (decoded by :func:`eidetic.images.decode_image`) -> ``(H, W, 3)`` float32 in [0, 1]."""
    spec = str(spec)
    path = Path(spec)
    if path.suffix and path.is_file():
        try:
            arr = decode_image(path)
        except Exception as exc:
            raise ImitationError(
                f"cannot read image {spec}: {type(exc).__name__}: {exc}"
            ) from exc
    elif not path.suffix and (spec in PHOTOS or spec in ALIASES):
        arr = load_photo(spec)
    else:
        raise ImitationError(
            f"cannot load image {spec!r}: give an existing image file path or one of the built-in photographs {', '.join(PHOTOS)}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32) / 255.0


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central ``size x size`` square of ``(H, W, C)``; ``size <= 0`` returns the image unchanged."""
    if size <= 0:
        return image
    h, w = image.shape[:2]
    if size > min(h, w):
        raise ImitationError(
            f"cannot cut a {size}x{size} crop from a {h}x{w} image: choose a size <= {min(h, w)}"
        )
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` numpy in [0, 1] → ``(3, H, W)`` float32 tensor."""
    return (
        torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        .permute(2, 0, 1)
        .contiguous()
    )


def to_numpy(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` tensor → ``(H, W, 3)`` float32 numpy."""
    return image.detach().cpu().float().permute(1, 2, 0).numpy()


def _fingerprint(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
