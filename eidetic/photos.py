"""The photographs that ship inside scikit-image (no download): the project's built-in real images.

One catalogue for everything that needs real photographs: the built-in training set, the
IRS reference, the imitation audit's examples and held-out images. ``cat`` is an alias of
``chelsea`` (the same picture).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["PHOTOS", "ALIASES", "photo_names", "load_photo"]

# name -> what the photograph shows (the subject of its captions in the built-in data set)
PHOTOS: dict[str, str] = {
    "astronaut": "an astronaut",
    "coffee": "a cup of coffee",
    "chelsea": "a tabby cat",
    "rocket": "a rocket on its launch pad",
    "camera": "a cameraman",
    "coins": "old coins",
    "moon": "the moon surface",
    "hubble_deep_field": "deep space galaxies",
    "immunohistochemistry": "stained tissue",
    "stereo_motorcycle": "a motorcycle",
    "brick": "a brick wall",
    "grass": "grass",
    "gravel": "gravel",
    "clock": "a clock",
    "retina": "a retina",
    "cell": "a cell under a microscope",
}
ALIASES = {"cat": "chelsea"}


def photo_names() -> list[str]:
    return list(PHOTOS)


@lru_cache(maxsize=None)
def _load(name: str) -> np.ndarray:
    import skimage.data

    from eidetic.images import to_rgb_uint8

    arr = getattr(skimage.data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo pairs come as (left, right, disparity)
    out = to_rgb_uint8(np.asarray(arr))
    out.setflags(write=False)
    return out


def load_photo(name: str) -> np.ndarray:
    """The photograph ``name`` (or an alias) as a read-only (H, W, 3) uint8 array."""
    key = ALIASES.get(name, name)
    if key not in PHOTOS:
        raise KeyError(f"no built-in photograph {name!r}; choose from {', '.join(PHOTOS)}")
    return _load(key)
