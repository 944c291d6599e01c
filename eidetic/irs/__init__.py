"""Image Realism Score (IRS, Chen et al. 2023): a non-learned, per-image realism metric.

Five statistics of the grayscale image, each divided by its mean over a reference set
of real photographs, become the radii of a pentagon; IRS is the pentagon's area,
``sum_i 1/2 * r_i * r_{i+1} * sin(72 deg)``:

====================  =======================================================  ========
statistic             definition here                                          inverted
====================  =======================================================  ========
edge_density          fraction of pixels on a Canny edge (skimage algorithm)   no
glcm_contrast         GLCM contrast, distance 1, 4 angles, symmetric, mean     no
glcm_energy           GLCM energy = sqrt(ASM) (skimage's ``energy``), mean     yes
laplacian_variance    population variance of the 3x3 Laplacian                 yes
fft_magnitude         mean |DFT| (orthonormal, DC removed)                     yes
====================  =======================================================  ========

The statistic list and the pentagon come from a public reimplementation; the paper text
itself could not be checked (see /work/shared/RESEARCH.md section 3).

Two ways to turn a normalised statistic ``s`` (``x / mean``, or ``mean / x`` for the
inverted three) into a radius (``IRSReference.mode``):

* ``"paper"``: ``r = s``. Monotone: more edges/contrast, less energy, less Laplacian
  variance and less spectral magnitude always mean "more real". This rewards blur
  without bound (a blurred image has a tiny Laplacian variance, so ``1/s`` explodes), so
  it cannot rank real photographs above blurred copies -- measured in tests/test_irs.py.
* ``"two_sided"`` (default): ``r = min(s, 1/s) = exp(-|log s|)``. A radius is 1 exactly
  at the reference mean and shrinks for a deviation either way, so IRS is largest
  (``5/2 * sin 72 = 2.378``) for an image whose statistics match real photographs and
  every departure (blur, noise, JPEG blocking, flattening) lowers it. Inversion is a
  no-op here (``min(s, 1/s)`` is symmetric); it is kept so both modes share one table.

Grayscale: images are (B, 3, H, W) in [-1, 1]; they are mapped to [0, 1] and combined
with the ITU-R BT.601 luma weights (0.299, 0.587, 0.114), the weights OpenCV's
``cvtColor(..., GRAY)`` uses (the public reimplementation reads images with OpenCV).
Single-channel (B, 1, H, W) input is used as is.

Deliberate differences from the public OpenCV-based reimplementation (all options):
Canny follows scikit-image (Gaussian sigma 1, thresholds 0.1/0.2 on the Sobel magnitude
of a [0, 1] image) rather than ``cv2.Canny(100, 200)`` on uint8; the GLCM uses 32 grey
levels, not 256, because at the 32-64 px images this project trains on a 256-level
co-occurrence matrix has ~4000 pairs for 65536 cells and its energy measures the pixel
count, not texture; the FFT statistic drops the DC term and uses the orthonormal DFT so
overall brightness and image size do not enter it.

Everything is batched torch (any device, float32 or float64). On CPU the exact statistics
run on groups of images sized for the L2 cache, with every buffer and shifted view made
once per call (a batch of small images is hundreds of tensor ops, and the fixed cost per
op is a large part of each); see ``_image_groups``, ``_WeakStrong`` and ``_GLCMSums``.

``soft_image_statistics`` is a differentiable surrogate (soft edges from a sigmoid of the
gradient magnitude, a soft GLCM from triangular soft histograms, a smoothed FFT modulus)
used by ``realism_loss``; the exact ``image_realism_score`` stays the metric.
"""

from __future__ import annotations

from .degradations import DEGRADATIONS, degrade
from .kernels import (
    canny_edges,
    fft_magnitude,
    glcm_contrast_energy,
    image_statistics,
    laplacian_variance,
    quantize,
    to_grayscale,
)
from .pentagon import max_score, pentagon_area, radii
from .reference import (
    IRSReference,
    builtin_photographs,
    default_reference,
    fit_threshold,
    random_crops,
)
from .score import image_realism_score, realism_loss, soft_image_realism_score
from .settings import INVERTED, MODES, STATISTICS, IRSSettings
from .surrogate import soft_image_statistics

__all__ = [
    "STATISTICS",
    "INVERTED",
    "IRSSettings",
    "IRSReference",
    "to_grayscale",
    "canny_edges",
    "quantize",
    "glcm_contrast_energy",
    "laplacian_variance",
    "fft_magnitude",
    "image_statistics",
    "soft_image_statistics",
    "radii",
    "pentagon_area",
    "max_score",
    "image_realism_score",
    "soft_image_realism_score",
    "realism_loss",
    "fit_threshold",
    "degrade",
    "builtin_photographs",
    "random_crops",
    "default_reference",
    "DEGRADATIONS",
    "MODES",
]
