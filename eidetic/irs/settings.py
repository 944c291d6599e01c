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
# The public reimplementation's grey conversion: np.dot(rgb_uint8, LUMA_PAPER).astype(uint8)
# (these weights sum to 0.9999, so white is 254, and the cast truncates).
LUMA_PAPER = (0.2989, 0.5870, 0.1140)
GRAY_MODES = ("bt601", "paper_uint8")
GLCM_ANGLES = ("four", "zero")
GLCM_ENERGIES = ("sqrt_asm", "asm")
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
    # "four": GLCM statistics averaged over 0, 45, 90, 135 degrees; "zero": the horizontal
    # neighbour only (the public reimplementation).
    glcm_angles: str = "four"
    # "sqrt_asm": skimage's ``energy``; "asm": the angular second moment itself (the paper's).
    glcm_energy: str = "sqrt_asm"
    # Include the DC coefficient (the image mean) in the mean FFT magnitude.
    fft_dc: bool = False
    # "bt601": float luma of the [0, 1] image; "paper_uint8": the image rounded to uint8,
    # converted with LUMA_PAPER and truncated to uint8 (as the reimplementation reads files),
    # with the Laplacian variance and FFT magnitude on its 0-255, unnormalised-DFT scale.
    gray: str = "bt601"

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
        for name, value, allowed in (
            ("glcm_angles", self.glcm_angles, GLCM_ANGLES),
            ("glcm_energy", self.glcm_energy, GLCM_ENERGIES),
            ("gray", self.gray, GRAY_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.soft_edge_width <= 0:
            raise ValueError(
                f"soft_edge_width must be positive, got {self.soft_edge_width}"
            )

    @classmethod
    def paper(cls) -> "IRSSettings":
        """The published definition, as the public reimplementation computes it: GLCM at
        angle 0, distance 1, 256 levels, symmetric, energy = ASM; mean |DFT| with DC; grey
        levels from the reimplementation's uint8 conversion. The one remaining difference is
        Canny (see the package docstring)."""
        return cls(
            glcm_levels=256,
            glcm_distance=1,
            glcm_angles="zero",
            glcm_energy="asm",
            fft_dc=True,
            gray="paper_uint8",
        )

    @property
    def is_paper(self) -> bool:
        return self == IRSSettings.paper()
