"""Image Realism Score (IRS, Chen et al. 2023): a non-learned, per-image realism metric.

Five statistics of the grayscale image, each divided by its mean over a reference set
of real photographs, become the radii of a pentagon; the score is the pentagon's area,
``sum_i 1/2 * r_i * r_{i+1} * sin(72 deg)``. Two scores are offered (``IRSReference.mode``),
and every report names which one it shows:

* ``"paper"`` -- **IRS**, the published definition as the public reimplementation
  (WorldFoundry's ``irs`` metric, after arXiv:2309.14756) computes it: radius ``r = s``
  with ``s = x / mean`` for edge density and GLCM contrast and ``s = mean / x`` for GLCM
  energy, Laplacian variance and FFT magnitude; statistics from
  :meth:`IRSSettings.paper`. Reported as ``irs_paper``.
* ``"two_sided"`` (default) -- **not IRS**: a two-sided variant, ``r = min(s, 1/s) =
  exp(-|log s|)``, with the project's statistics (below). Reported as ``irs_two_sided``.

The statistics (in pentagon order; the last three enter inverted), paper / default:

* edge_density: fraction of pixels on a Canny edge (skimage algorithm, see below) / same;
* glcm_contrast: GLCM contrast, distance 1, angle 0, 256 levels / distance 1, averaged
  over 0, 45, 90, 135 degrees, 32 levels;
* glcm_energy: GLCM angular second moment (ASM), angle 0, 256 levels / sqrt(ASM)
  (skimage's ``energy``), four angles, 32 levels;
* laplacian_variance: population variance of the 3x3 Laplacian, on the 0-255 scale / on
  the [0, 1] scale;
* fft_magnitude: mean |fft2| including DC, unnormalised, 0-255 image / mean |DFT|,
  orthonormal, DC removed.

Grey image: paper mode rounds RGB to uint8 and converts as the reimplementation does
(``np.dot(rgb, (0.2989, 0.587, 0.114)).astype(uint8)``, a truncation); the default uses
float BT.601 luma (0.299, 0.587, 0.114) of the [0, 1] image. Single-channel input is used
as is. Both GLCMs are symmetric and normalised.

Paper mode differs from the reimplementation in one statistic: edges. The reimplementation
calls ``cv2.Canny(gray_uint8, 100, 200)`` (no Gaussian smoothing, L1 gradient, OpenCV's
border rules); OpenCV is not a dependency, so both modes use scikit-image's Canny
algorithm (Gaussian sigma 1, thresholds 0.1/0.2 on the Sobel magnitude of the [0, 1]
image), reimplemented here in torch. Minor: the reimplementation floors reference means
(e.g. at 1.0 for contrast) and inverted ratios at 1e-8; this package clamps statistics at
1e-12 -- only a constant reference or image tells them apart.

Why the default departs from the paper (each a deliberate choice, each an option):

* two-sided radii: with ``r = s`` the score is monotone -- more edges/contrast, less
  energy, less Laplacian variance and less spectral magnitude always look "more real" --
  so blur, which shrinks the Laplacian variance, raises it without bound; it cannot rank
  real photographs above blurred copies (measured in tests/test_irs.py). With
  ``min(s, 1/s)`` a radius is 1 exactly at the reference mean and shrinks for a deviation
  either way, so the score is largest (``5/2 * sin 72 = 2.378``) for an image whose
  statistics match real photographs and every departure (blur, noise, JPEG blocking,
  flattening) lowers it. Inversion is a no-op there (``min(s, 1/s)`` is symmetric);
* 32 grey levels: at the 32-64 px images this project trains on, a 256-level
  co-occurrence matrix has ~4000 pairs for 65536 cells, so its energy measures the pixel
  count, not texture;
* sqrt(ASM) and four angles: skimage's ``energy`` and a rotation-averaged texture;
* no DC, orthonormal DFT, [0, 1] scale: overall brightness and image size do not enter
  the spectral statistic (scale factors cancel in the normalisation anyway);
* float luma: generated images are floats; rounding to uint8 first adds quantisation.

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
