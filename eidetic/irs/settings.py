"""The five IRS statistics, their inversion, and the settings they are computed with."""

from __future__ import annotations

import math
from dataclasses import dataclass

STATISTICS = (
    "edge_density",
    "glcm_contrast",
    "glcm_energy",
    "laplacian_variance",
    "fft_magnitude",
)
INVERTED = (False, False, True, True, True)
MODES = ("two_sided", "paper")
SIN72 = math.sin(math.radians(72.0))
LUMA_BT601 = (0.299, 0.587, 0.114)
# Statistics are clamped here before normalising so a constant image (zero Laplacian
# variance, zero spectrum) gives a zero radius instead of 0/0.
_TINY = 1e-12


@dataclass(frozen=True)
class IRSSettings:
    """How the five statistics are computed; a reference is only valid for one setting."""

    canny_sigma: float = 1.0
    canny_low: float = (
        0.1  # on the Sobel magnitude of the smoothed [0, 1] image (skimage default)
    )
    canny_high: float = 0.2
    glcm_levels: int = 32
    glcm_distance: int = 1
    # Surrogate only: the soft edge indicator is sigmoid((|grad| - centre) / width).
    soft_edge_width: float = 0.03

    def __post_init__(self):
        if not 0 < self.canny_low <= self.canny_high:
            raise ValueError(
                f"need 0 < canny_low <= canny_high, got {self.canny_low}, {self.canny_high}"
            )
        if self.canny_sigma <= 0:
            raise ValueError(f"canny_sigma must be positive, got {self.canny_sigma}")
        if (
            int(self.glcm_levels) != self.glcm_levels
            or not 2 <= self.glcm_levels <= 256
        ):
            raise ValueError(
                f"glcm_levels must be an integer in [2, 256], got {self.glcm_levels}"
            )
        if int(self.glcm_distance) != self.glcm_distance or self.glcm_distance < 1:
            raise ValueError(
                f"glcm_distance must be a positive integer, got {self.glcm_distance}"
            )
        if self.soft_edge_width <= 0:
            raise ValueError(
                f"soft_edge_width must be positive, got {self.soft_edge_width}"
            )
