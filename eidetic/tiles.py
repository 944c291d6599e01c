"""Thousands of distinct real images from the built-in photographs: non-overlapping tiles.

The selective-memorization benchmark needs a training set large enough that single images
are not memorized, made of images that are really distinct (random crops of 16 photographs
overlap heavily, so they are not). Each photograph is cut into non-overlapping square tiles
of ``resolution * scale`` pixels, downsampled (antialiased) to ``resolution``; tiles that are
nearly flat (pixel std below ``min_std``) are dropped, then near-duplicates (the greedy rule
of :func:`eidetic.mitigations.near_duplicates` on 8x8 grey thumbnails); scikit-image's 200
LFW faces are added (grey, upsampled). Every tile gets its own caption naming the photograph's
subject and the tile's position, so the caption identifies the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from eidetic.photos import PHOTOS, load_photo

__all__ = ["photo_tiles"]

_STYLES = ("a photo of", "a close-up of", "a picture of", "a crop of", "a detail of")


def _resize(tiles: np.ndarray, resolution: int) -> np.ndarray:
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def photo_tiles(resolution: int, scale: int = 2, min_std: float = 0.02, near_duplicate_threshold: float = 0.02,
                faces: bool = True) -> tuple[list[dict], np.ndarray]:
    """(records, (N, resolution, resolution, 3) uint8): ``id``, ``source`` and ``caption`` per tile."""
    from eidetic.mitigations import near_duplicates, perceptual_features

    if scale < 1:
        raise ValueError(f"tile scale must be >= 1, got {scale}")
    side = resolution * scale
    records, chunks = [], []
    for k, name in enumerate(PHOTOS):
        photo = load_photo(name)
        rows, cols = photo.shape[0] // side, photo.shape[1] // side
        if not rows or not cols:
            continue
        tiles = photo[: rows * side, : cols * side].reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4).reshape(-1, side, side, 3)
        chunks.append(_resize(np.ascontiguousarray(tiles), resolution))
        for r in range(rows):
            for c in range(cols):
                style = _STYLES[(r * cols + c + k) % len(_STYLES)]
                records.append({"id": f"{name}-{r:02d}-{c:02d}", "source": f"skimage.data.{name}",
                                "caption": f"{style} {PHOTOS[name]}, tile {r} {c}"})
    if faces:
        import skimage.data

        lfw = (np.asarray(skimage.data.lfw_subset()) * 255).round().astype(np.uint8)  # (200, 25, 25) grey
        chunks.append(_resize(np.repeat(lfw[..., None], 3, axis=-1), resolution))
        records += [{"id": f"lfw-{i:03d}", "source": "skimage.data.lfw_subset", "caption": f"a portrait of a face, number {i}"}
                    for i in range(len(lfw))]
    arrays = np.concatenate(chunks)
    keep = np.flatnonzero((arrays / 255.0).reshape(len(arrays), -1).std(axis=1) > min_std)
    arrays, records = arrays[keep], [records[i] for i in keep]
    feats = perceptual_features(torch.from_numpy(arrays).permute(0, 3, 1, 2), 8)
    dropped = {d.removed for d in near_duplicates(feats, near_duplicate_threshold)}
    keep = [i for i in range(len(records)) if i not in dropped]
    return [records[i] for i in keep], arrays[keep]
