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

Everything is batched torch (any device, float32 or float64). ``soft_image_statistics``
is a differentiable surrogate (soft edges from a sigmoid of the gradient magnitude, a soft
GLCM from triangular soft histograms, a smoothed FFT modulus) used by
``realism_loss``; the exact ``image_realism_score`` stays the metric.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
]

STATISTICS = ("edge_density", "glcm_contrast", "glcm_energy", "laplacian_variance", "fft_magnitude")
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
    canny_low: float = 0.1  # on the Sobel magnitude of the smoothed [0, 1] image (skimage default)
    canny_high: float = 0.2
    glcm_levels: int = 32
    glcm_distance: int = 1
    # Surrogate only: the soft edge indicator is sigmoid((|grad| - centre) / width).
    soft_edge_width: float = 0.03

    def __post_init__(self):
        if not 0 < self.canny_low <= self.canny_high:
            raise ValueError(f"need 0 < canny_low <= canny_high, got {self.canny_low}, {self.canny_high}")
        if self.canny_sigma <= 0:
            raise ValueError(f"canny_sigma must be positive, got {self.canny_sigma}")
        if int(self.glcm_levels) != self.glcm_levels or not 2 <= self.glcm_levels <= 256:
            raise ValueError(f"glcm_levels must be an integer in [2, 256], got {self.glcm_levels}")
        if int(self.glcm_distance) != self.glcm_distance or self.glcm_distance < 1:
            raise ValueError(f"glcm_distance must be a positive integer, got {self.glcm_distance}")
        if self.soft_edge_width <= 0:
            raise ValueError(f"soft_edge_width must be positive, got {self.soft_edge_width}")


# ---------------------------------------------------------------------------------------
# grayscale and filters
# ---------------------------------------------------------------------------------------


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (B, 1, H, W) images in [-1, 1] -> (B, H, W) luma in [0, 1] (BT.601)."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"IRS expects (B, 3, H, W) or (B, 1, H, W) image tensors in [-1, 1], got {shape}")
    if images.shape[-1] < 8 or images.shape[-2] < 8:
        raise ValueError(f"IRS needs images of at least 8x8 pixels, got {tuple(images.shape[-2:])}")
    if not images.is_floating_point():
        raise ValueError(f"IRS expects float images in [-1, 1], got dtype {images.dtype}; convert with x/127.5-1")
    x = (images + 1.0) * 0.5
    if x.shape[1] == 1:
        return x[:, 0]
    r, g, b = LUMA_BT601
    return x[:, 0] * r + x[:, 1] * g + x[:, 2] * b


def _gaussian_kernel1d(sigma: float, dtype, device) -> torch.Tensor:
    # scipy.ndimage.gaussian_filter with truncate=4.0 (what skimage's canny uses)
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _filter_matrix_cached(n: int, kernel: tuple[float, ...], pad_mode: str) -> torch.Tensor:
    r = len(kernel) // 2
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for t, wgt in enumerate(kernel):
            j = i + t - r
            if pad_mode == "replicate":
                j = min(max(j, 0), n - 1)
            elif pad_mode != "constant":
                raise ValueError(f"unsupported pad mode {pad_mode!r}")
            if 0 <= j < n:
                m[i, j] += wgt
    return m


def _filter_matrix(n: int, kernel, pad_mode: str, like: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix M with ``M @ x`` = scipy ``correlate1d(x, kernel)`` along an axis of
    length n; pad_mode 'constant' (zeros) or 'replicate' (scipy's 'reflect' for a
    one-pixel pad). Filtering as small matrix products is much faster on CPU than
    ``F.conv2d`` with one channel or a chain of shifted-slice additions."""
    kernel = tuple(float(k) for k in (kernel.tolist() if torch.is_tensor(kernel) else kernel))
    return _filter_matrix_cached(int(n), kernel, pad_mode).to(dtype=like.dtype, device=like.device)


def _separable(x: torch.Tensor, k_rows, k_cols, pad_mode: str) -> torch.Tensor:
    """Correlate (..., H, W) with k_rows along H and k_cols along W."""
    h, w = x.shape[-2:]
    return _filter_matrix(h, k_rows, pad_mode, x) @ x @ _filter_matrix(w, k_cols, pad_mode, x).T


def _smooth(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """skimage canny's smoothing: zero-padded Gaussian divided by the Gaussian of ones."""
    k = _gaussian_kernel1d(sigma, torch.float64, "cpu")
    smoothed = _separable(gray, k, k, "constant")
    ones = torch.ones_like(gray[:1])
    bleed = _separable(ones, k, k, "constant") + torch.finfo(gray.dtype).eps
    return smoothed / bleed


_DERIV = (-1.0, 0.0, 1.0)
_SMOOTH3 = (1.0, 2.0, 1.0)


def _sobel(smoothed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ndi.sobel along axis 0 and axis 1 (scipy's 'reflect' border = edge replication
    for a one-pixel pad)."""
    isobel = _separable(smoothed, _DERIV, _SMOOTH3, "replicate")  # derivative along rows (axis 0)
    jsobel = _separable(smoothed, _SMOOTH3, _DERIV, "replicate")  # derivative along columns (axis 1)
    return isobel, jsobel


# ---------------------------------------------------------------------------------------
# exact statistics
# ---------------------------------------------------------------------------------------


def canny_edges(gray: torch.Tensor, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """Boolean Canny edge maps of (B, H, W) images in [0, 1], batched.

    The algorithm of ``skimage.feature.canny`` (mode='constant'): bleed-over-corrected
    Gaussian smoothing, Sobel gradients, non-maximum suppression with bilinear
    interpolation between the two neighbours along the gradient, the one-pixel image
    border excluded, then hysteresis with 8-connectivity. Hysteresis grows the strong
    pixels through the weak ones by repeated 3x3 dilation until nothing changes, which
    keeps exactly the 8-connected weak components that contain a strong pixel.
    """
    smoothed = _smooth(gray, sigma)
    isobel, jsobel = _sobel(smoothed)
    mag = torch.sqrt(isobel * isobel + jsobel * jsobel)
    b, h, w = mag.shape
    pad = F.pad(mag, (1, 1, 1, 1))

    def at(di: int, dj: int) -> torch.Tensor:  # magnitude[x + di, y + dj]
        return pad[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    ai, aj = isobel.abs(), jsobel.abs()
    # Branch masks as 0/1 floats; ``torch.lerp(b, a, m)`` selects a where m == 1 and b
    # where m == 0 exactly, and is far faster on CPU than ``torch.where``.
    cond1 = ((isobel > 0) == (jsobel > 0)).to(mag.dtype)  # gradient components of equal sign
    big_i = (ai > aj).to(mag.dtype)
    small_i = (ai < aj).to(mag.dtype)
    sel = torch.lerp
    # w = min(|i|, |j|) / max(|i|, |j|) in all four cases of skimage's loop (0/0 only
    # where the magnitude is 0, and those pixels are below the low threshold anyway)
    w1 = torch.minimum(ai, aj) / torch.maximum(ai, aj)
    # skimage's four cases, folded: the diagonal neighbours are (x+1,y+1)/(x-1,y-1) when
    # the gradient components have equal signs (cond1) and (x-1,y+1)/(x+1,y-1)
    # otherwise; the axial neighbours are (x, y+1)/(x, y-1) unless the row gradient
    # dominates (|i| > |j| for cond1, |i| >= |j| otherwise), then (x+1,y)/(x-1,y) for
    # cond1 and (x-1,y)/(x+1,y) otherwise.
    row_major = sel(1.0 - small_i, big_i, cond1)
    n11 = sel(at(0, 1), sel(at(-1, 0), at(1, 0), cond1), row_major)
    n21 = sel(at(0, -1), sel(at(1, 0), at(-1, 0), cond1), row_major)
    n12 = sel(at(-1, 1), at(1, 1), cond1)
    n22 = sel(at(1, -1), at(-1, -1), cond1)
    # A neighbour counts as larger only beyond a few ulps: the matrix-product filters sum
    # in a different order than scipy, and on exactly symmetric edges (the two pixels
    # straddling a step have equal magnitude, both kept by skimage's ``<=``) rounding
    # would otherwise decide which one survives.
    limit = mag * (1.0 + 16 * torch.finfo(mag.dtype).eps)
    is_max = ((n12 * w1 + n11 * (1.0 - w1)) <= limit) & ((n22 * w1 + n21 * (1.0 - w1)) <= limit)
    interior = torch.zeros(h, w, dtype=torch.bool, device=mag.device)
    interior[1:-1, 1:-1] = True
    weak = is_max & interior & (mag >= low)
    strong = weak & (mag >= high)
    return _hysteresis(strong, weak)


def _dilate3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 binary dilation of (B, H, W) uint8 maps (separable max over shifted slices)."""
    p = F.pad(x, (1, 1, 1, 1))
    r = torch.maximum(torch.maximum(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    return torch.maximum(torch.maximum(r[:, :, :-2], r[:, :, 1:-1]), r[:, :, 2:])


def _hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Weak pixels 8-connected (through weak pixels) to a strong pixel, plus the strong ones.

    Grows the strong set by dilation inside the weak mask until it stops changing, which
    is the same set as skimage's label-and-keep. Only images still changing take part in
    the next rounds, so a few long edges do not make the whole batch iterate.
    """
    grown = strong.to(torch.uint8)
    weak_u8 = weak.to(torch.uint8)
    active = torch.arange(grown.shape[0], device=grown.device)
    cur, cur_weak = grown, weak_u8
    while True:
        before = cur
        for _ in range(4):
            cur = _dilate3x3(cur) * cur_weak
        changed = (cur != before).flatten(1).any(1)
        if not changed.any():
            grown[active] = cur
            break
        done = ~changed
        if done.any():  # write back the converged images, keep iterating the rest
            grown[active[done]] = cur[done]
            active, cur, cur_weak = active[changed], cur[changed], cur_weak[changed]
    return grown.bool()


def quantize(gray: torch.Tensor, levels: int) -> torch.Tensor:
    """(B, H, W) [0, 1] -> integer grey levels 0..levels-1 (``floor(g * levels)``, clipped)."""
    return (gray * levels).floor().clamp_(0, levels - 1).int()


def _glcm_offsets(distance: int) -> list[tuple[int, int]]:
    # angles 0, 45, 90, 135 degrees; with a symmetric GLCM the sign of an offset is irrelevant
    return [(0, distance), (distance, distance), (distance, 0), (distance, -distance)]


def _pairs(x: torch.Tensor, di: int, dj: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    a = x[..., max(0, -di) : h - max(0, di), max(0, -dj) : w - max(0, dj)]
    b = x[..., max(0, di) : h + min(0, di), max(0, dj) : w + min(0, dj)]
    return a, b


def glcm_contrast_energy(gray: torch.Tensor, levels: int = 32, distance: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """GLCM contrast and energy (sqrt of the angular second moment) of (B, H, W) images.

    As ``graycoprops(graycomatrix(quantize(g), [distance], [0, pi/4, pi/2, 3pi/4],
    levels, symmetric=True, normed=True), prop)``, averaged over the four angles.
    """
    q = quantize(gray, levels)
    b = q.shape[0]
    contrast = torch.zeros(b, dtype=gray.dtype, device=gray.device)
    energy = torch.zeros_like(contrast)
    base = torch.arange(b, device=q.device, dtype=q.dtype).view(b, 1, 1) * (levels * levels)
    hist = torch.zeros(b * levels * levels, dtype=torch.int32, device=q.device)
    ones = torch.ones(q[:, 1:].numel(), dtype=torch.int32, device=q.device)
    for di, dj in _glcm_offsets(distance):
        a, c = _pairs(q, di, dj)
        n_pairs = a[0].numel()
        # directed counts C; the symmetric GLCM is P = (C + C^T) / (2 n_pairs)
        idx = (base + a * levels + c).reshape(-1).long()
        # one histogram buffer reused across offsets: re-zeroing it is much cheaper than
        # bincount's fresh (B * L * L) allocation per offset
        hist.zero_().scatter_add_(0, idx, ones[: idx.numel()])
        counts = hist.view(b, levels, levels).to(gray.dtype)
        sym = counts + counts.transpose(1, 2)
        energy += torch.sqrt((sym * sym).sum(dim=(1, 2))) / (2 * n_pairs)
        d = (a - c).to(gray.dtype)
        contrast += (d * d).flatten(1).sum(1) / n_pairs
    k = len(_glcm_offsets(distance))
    return contrast / k, energy / k


def laplacian_variance(gray: torch.Tensor) -> torch.Tensor:
    """Population variance of ``skimage.filters.laplace`` (3x3 kernel, 'reflect' border)."""
    h, w = gray.shape[-2:]
    rows = _filter_matrix(h, (-1.0, 2.0, -1.0), "replicate", gray)
    cols = _filter_matrix(w, (-1.0, 2.0, -1.0), "replicate", gray)
    lap = rows @ gray + gray @ cols.T  # the 5-point Laplacian is the sum of two 1-D ones
    lap = lap.flatten(1)
    centred = lap - lap.mean(1, keepdim=True)
    return (centred * centred).mean(1)


def fft_magnitude(gray: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Mean modulus of the orthonormal 2-D DFT of the mean-subtracted image.

    ``eps > 0`` smooths the modulus as sqrt(|F|^2 + eps^2) so its gradient is finite at
    zero (the surrogate uses this).
    """
    centred = gray - gray.mean(dim=(-2, -1), keepdim=True)
    spec = torch.fft.fft2(centred, norm="ortho")
    power = spec.real * spec.real + spec.imag * spec.imag
    mod = torch.sqrt(power + eps * eps) if eps > 0 else torch.sqrt(power)
    return mod.flatten(1).mean(1)


def image_statistics(images: torch.Tensor, settings: IRSSettings | None = None) -> torch.Tensor:
    """The five IRS statistics, (B, 5) in the order of ``STATISTICS``. Not differentiable."""
    s = settings or IRSSettings()
    with torch.no_grad():
        gray = to_grayscale(images)
        edges = canny_edges(gray, s.canny_sigma, s.canny_low, s.canny_high)
        contrast, energy = glcm_contrast_energy(gray, s.glcm_levels, s.glcm_distance)
        return torch.stack(
            [edges.to(gray.dtype).flatten(1).mean(1), contrast, energy, laplacian_variance(gray), fft_magnitude(gray)],
            dim=1,
        )


# ---------------------------------------------------------------------------------------
# differentiable surrogate
# ---------------------------------------------------------------------------------------


def _soft_levels(gray: torch.Tensor, levels: int) -> torch.Tensor:
    """Triangular soft histogram weights (B, H, W, L): each pixel splits its unit mass
    between the two nearest bin centres (k + 0.5) / L, linearly."""
    u = (gray * levels - 0.5).clamp(0, levels - 1)
    centres = torch.arange(levels, dtype=gray.dtype, device=gray.device)
    return torch.relu(1.0 - (u.unsqueeze(-1) - centres).abs())


def soft_image_statistics(images: torch.Tensor, settings: IRSSettings | None = None) -> torch.Tensor:
    """Differentiable stand-ins for the five statistics, (B, 5), finite gradients everywhere.

    * edges: mean of sigmoid((|Sobel(smoothed)| - c) / width), c the midpoint of the
      Canny thresholds; no thinning (non-maximum suppression has no useful gradient);
    * GLCM: the same co-occurrence statistics computed from triangular soft histograms,
      so every pixel pair contributes a 2x2 patch of soft counts;
    * Laplacian variance: exact (already differentiable);
    * FFT: sqrt(|F|^2 + eps^2) instead of |F|, finite gradient at zero.
    The surrogate has its own reference means (``IRSReference.soft_means``), so its
    scale differences from the exact statistics cancel in the normalisation.
    """
    s = settings or IRSSettings()
    gray = to_grayscale(images)
    isobel, jsobel = _sobel(_smooth(gray, s.canny_sigma))
    mag = torch.sqrt(isobel * isobel + jsobel * jsobel + 1e-12)
    centre = 0.5 * (s.canny_low + s.canny_high)
    edges = torch.sigmoid((mag - centre) / s.soft_edge_width).flatten(1).mean(1)

    L = s.glcm_levels
    soft = _soft_levels(gray, L)  # (B, H, W, L)
    levels = torch.arange(L, dtype=gray.dtype, device=gray.device)
    sq_dist = (levels.view(-1, 1) - levels.view(1, -1)) ** 2
    contrast = torch.zeros(gray.shape[0], dtype=gray.dtype, device=gray.device)
    energy = torch.zeros_like(contrast)
    offsets = _glcm_offsets(s.glcm_distance)
    for di, dj in offsets:
        a, c = _pairs(soft.movedim(-1, 1), di, dj)  # (B, L, h', w')
        a, c = a.flatten(2), c.flatten(2)
        glcm = torch.bmm(a, c.transpose(1, 2))  # (B, L, L) soft counts
        glcm = glcm + glcm.transpose(1, 2)
        p = glcm / glcm.sum(dim=(1, 2), keepdim=True)
        energy = energy + torch.sqrt((p * p).sum(dim=(1, 2)))
        contrast = contrast + (p * sq_dist).sum(dim=(1, 2))
    contrast, energy = contrast / len(offsets), energy / len(offsets)
    return torch.stack([edges, contrast, energy, laplacian_variance(gray), fft_magnitude(gray, eps=1e-4)], dim=1)


# ---------------------------------------------------------------------------------------
# pentagon
# ---------------------------------------------------------------------------------------


def radii(stats: torch.Tensor, means: torch.Tensor, mode: str = "two_sided") -> torch.Tensor:
    """Normalised statistics -> pentagon radii (B, 5); see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"unknown IRS mode {mode!r}; use one of {MODES}")
    means = torch.as_tensor(means, dtype=stats.dtype, device=stats.device)
    inverted = torch.tensor(INVERTED, device=stats.device)
    x = stats.clamp_min(_TINY)
    ratio = torch.where(inverted, means / x, x / means)
    if mode == "paper":
        return ratio
    return torch.exp(-torch.log(ratio).abs())  # = min(s, 1/s), smooth enough for autograd


def pentagon_area(r: torch.Tensor) -> torch.Tensor:
    """Area of the pentagon with radii ``r`` (B, 5) at 72 degree spacing."""
    return 0.5 * SIN72 * (r * r.roll(-1, dims=1)).sum(1)


def max_score() -> float:
    """IRS of an image whose statistics equal the reference means (all radii 1)."""
    return 2.5 * SIN72


# ---------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------


def _batches(source, batch_size: int) -> Iterable[torch.Tensor]:
    """Image batches from a tensor, or an iterable of tensors / (tensor, ...) / {'images': tensor}."""
    if torch.is_tensor(source):
        for i in range(0, source.shape[0], batch_size):
            yield source[i : i + batch_size]
        return
    for item in source:
        if isinstance(item, dict):
            if "images" not in item:
                raise ValueError(f"a dict batch needs an 'images' entry, got keys {sorted(item)}")
            item = item["images"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        if not torch.is_tensor(item):
            raise ValueError(f"expected image tensors (B, 3, H, W) in [-1, 1], got {type(item).__name__}")
        yield item if item.ndim == 4 else item.unsqueeze(0)


@dataclass
class IRSReference:
    """What IRS is measured against: the reference means of the five statistics (exact and
    surrogate), the settings they were computed with, the radius mode, and the real/fake
    threshold. Saved as a small JSON file."""

    means: tuple[float, ...]
    soft_means: tuple[float, ...]
    settings: IRSSettings = field(default_factory=IRSSettings)
    mode: str = "two_sided"
    threshold: float | None = None
    threshold_rule: str = ""
    n_images: int = 0
    resolution: tuple[int, int] | None = None
    source: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown IRS mode {self.mode!r}; use one of {MODES}")
        for name, values in (("means", self.means), ("soft_means", self.soft_means)):
            if len(values) != len(STATISTICS) or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"IRSReference.{name} must be {len(STATISTICS)} positive finite numbers, got {values}")
        self.means = tuple(float(v) for v in self.means)
        self.soft_means = tuple(float(v) for v in self.soft_means)

    # -- fitting --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        images,
        settings: IRSSettings | None = None,
        mode: str = "two_sided",
        batch_size: int = 256,
        source: str = "",
        threshold: str | None = "youden",
        false_fake_rate: float = 0.05,
    ) -> "IRSReference":
        """Fit the reference means from real images (a tensor or an iterable of batches).

        The real/fake threshold is fitted on the same reference data:

        * ``"youden"`` (default): every reference image is also degraded four ways
          (``degrade``: blur, noise, JPEG, flatten at their default strengths); the
          threshold is the cut on IRS that maximises Youden's J between the reference
          images and their degraded copies;
        * ``"quantile"``: the ``false_fake_rate`` quantile of the reference images' own
          IRS (no fakes needed; calls that fraction of real images fake, but lets most
          degraded images pass because real images vary a lot);
        * ``None``: no threshold.
        """
        if threshold not in ("youden", "quantile", None):
            raise ValueError(f"threshold must be 'youden', 'quantile' or None, got {threshold!r}")
        settings = settings or IRSSettings()
        exact, soft, fakes, resolution = [], [], [], None
        for batch in _batches(images, batch_size):
            resolution = tuple(batch.shape[-2:])
            exact.append(image_statistics(batch, settings).double().cpu())
            with torch.no_grad():
                soft.append(soft_image_statistics(batch, settings).double().cpu())
            if threshold == "youden":
                for i, kind in enumerate(DEGRADATIONS):
                    fakes.append(image_statistics(degrade(batch, kind, seed=len(fakes) + i), settings).double().cpu())
        if not exact:
            raise ValueError("IRSReference.fit got no images")
        exact, soft = torch.cat(exact), torch.cat(soft)
        means = exact.clamp_min(_TINY).mean(0)
        soft_means = soft.clamp_min(_TINY).mean(0)
        if not (means > _TINY).all():
            raise ValueError(f"reference images give a zero statistic ({dict(zip(STATISTICS, means.tolist()))}); "
                             "are they constant images?")
        ref = cls(tuple(means.tolist()), tuple(soft_means.tolist()), settings, mode, None, "", exact.shape[0], resolution, source)
        if threshold is not None:
            scores = pentagon_area(radii(exact, means, mode))
            fake_scores = pentagon_area(radii(torch.cat(fakes), means, mode)) if fakes else None
            ref.threshold, ref.threshold_rule = fit_threshold(scores, fake_scores, false_fake_rate=false_fake_rate)
        return ref

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["statistics"] = list(STATISTICS)
        d["inverted"] = list(INVERTED)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IRSReference":
        d = dict(d)
        stats = d.pop("statistics", list(STATISTICS))
        d.pop("inverted", None)
        if list(stats) != list(STATISTICS):
            raise ValueError(f"reference lists statistics {stats}, this version computes {list(STATISTICS)}")
        d["settings"] = IRSSettings(**d.get("settings", {}))
        if d.get("resolution") is not None:
            d["resolution"] = tuple(d["resolution"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from eidetic.io import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "IRSReference":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no IRS reference at {path}; fit one with IRSReference.fit(images).save(path)")
        return cls.from_dict(json.loads(path.read_text()))

    def with_threshold(self, threshold: float, rule: str) -> "IRSReference":
        return replace(self, threshold=float(threshold), threshold_rule=rule)


def fit_threshold(real_scores, fake_scores=None, false_fake_rate: float = 0.05) -> tuple[float, str]:
    """A real/fake IRS threshold (an image is called fake when IRS < threshold).

    Without fake scores: the ``false_fake_rate`` quantile of the real scores. With fake
    scores: the cut that maximises Youden's J = TPR(real) - FPR(fake) over all midpoints
    between sorted scores. Returns (threshold, a one-line description of the rule).
    """
    real = torch.as_tensor(real_scores, dtype=torch.float64).flatten()
    if real.numel() == 0:
        raise ValueError("fit_threshold needs at least one real score")
    if fake_scores is None:
        if not 0 <= false_fake_rate < 1:
            raise ValueError(f"false_fake_rate must be in [0, 1), got {false_fake_rate}")
        t = torch.quantile(real, false_fake_rate).item()
        return t, f"{false_fake_rate:g} quantile of IRS over {real.numel()} reference images"
    fake = torch.as_tensor(fake_scores, dtype=torch.float64).flatten()
    allv = torch.cat([real, fake]).sort().values
    cuts = torch.cat([allv[:1] - 1e-9, 0.5 * (allv[1:] + allv[:-1]), allv[-1:] + 1e-9])
    tpr = (real.view(1, -1) >= cuts.view(-1, 1)).double().mean(1)
    fpr = (fake.view(1, -1) >= cuts.view(-1, 1)).double().mean(1)
    j = tpr - fpr
    best = int(torch.argmax(j))
    return cuts[best].item(), f"Youden-optimal cut between {real.numel()} real and {fake.numel()} degraded images (J={j[best].item():.3f})"


# ---------------------------------------------------------------------------------------
# scores and loss
# ---------------------------------------------------------------------------------------


def _reference(reference: IRSReference | None, images: torch.Tensor) -> IRSReference:
    if reference is None:
        return default_reference(tuple(images.shape[-2:]))
    if not isinstance(reference, IRSReference):
        raise TypeError(f"reference must be an IRSReference (or None for the built-in one), got {type(reference).__name__}")
    return reference


def image_realism_score(images: torch.Tensor, reference: IRSReference | None = None) -> torch.Tensor:
    """Exact IRS of every image in a (B, 3, H, W) batch in [-1, 1] -> (B,) (higher = more real).

    ``reference=None`` uses the built-in reference fitted at the images' resolution.
    """
    ref = _reference(reference, images)
    stats = image_statistics(images, ref.settings)
    return pentagon_area(radii(stats, ref.means, ref.mode))


def soft_image_realism_score(images: torch.Tensor, reference: IRSReference | None = None) -> torch.Tensor:
    """Differentiable surrogate of ``image_realism_score`` (uses ``reference.soft_means``)."""
    ref = _reference(reference, images)
    stats = soft_image_statistics(images, ref.settings)
    return pentagon_area(radii(stats, ref.soft_means, ref.mode))


def realism_loss(images: torch.Tensor, reference: IRSReference | None = None) -> torch.Tensor:
    """Scalar loss ``1 - mean(soft IRS) / max IRS``: 0 when every image matches the
    reference statistics, up to 1 (two-sided mode). Differentiable w.r.t. ``images``."""
    return 1.0 - soft_image_realism_score(images, reference).mean() / max_score()


# ---------------------------------------------------------------------------------------
# degradations (negatives for tests, thresholds and benchmarks)
# ---------------------------------------------------------------------------------------

DEGRADATIONS = ("blur", "noise", "jpeg", "flatten")


def degrade(images: torch.Tensor, kind: str, strength: float | None = None, seed: int = 0) -> torch.Tensor:
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
        noise = torch.randn(images.shape, generator=g, dtype=images.dtype).to(images.device)
        return (images + std * noise).clamp(-1, 1)
    if kind == "jpeg":
        import io

        from PIL import Image

        quality = 10 if strength is None else int(strength)
        out = []
        for img in images:
            arr = ((img.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
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


# ---------------------------------------------------------------------------------------
# built-in real images and the default reference
# ---------------------------------------------------------------------------------------

# Photographs (and photographic scans) that ship inside scikit-image: no download needed.
BUILTIN_PHOTOGRAPHS = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "coins", "rocket", "moon",
    "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle", "brick", "grass",
    "gravel", "clock", "page", "text", "cell", "retina",
)


def builtin_photographs() -> list[np.ndarray]:
    """The built-in photographs as (H, W, 3) uint8 arrays (grayscale ones replicated)."""
    from skimage import data

    photos = []
    for name in BUILTIN_PHOTOGRAPHS:
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return photos


def random_crops(photos: Sequence[np.ndarray], n: int, size: int | tuple[int, int], seed: int = 0,
                 min_scale: float = 0.15, max_scale: float = 0.6) -> torch.Tensor:
    """``n`` random square crops resized to ``size`` -> (n, 3, H, W) in [-1, 1].

    A crop's side is a uniform fraction in [min_scale, max_scale] of the photo's shorter
    side, so crops mix close-up texture and wider scenes; photos are drawn uniformly.
    The resize is an antialiased bilinear downscale.
    """
    h_out, w_out = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, h_out, w_out)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        short = min(img.shape[:2])
        side = max(min(h_out, w_out), int(short * rng.uniform(min_scale, max_scale)))
        side = min(side, short)
        top = rng.integers(img.shape[0] - side + 1)
        left = rng.integers(img.shape[1] - side + 1)
        crop = torch.from_numpy(img[top : top + side, left : left + side]).permute(2, 0, 1).float().unsqueeze(0)
        crop = F.interpolate(crop, size=(h_out, w_out), mode="bilinear", antialias=True, align_corners=False)
        out[i] = (crop[0] / 127.5 - 1).clamp(-1, 1)
    return out


@lru_cache(maxsize=8)
def _default_reference_cached(resolution: tuple[int, int], n_crops: int, seed: int, mode: str) -> IRSReference:
    crops = random_crops(builtin_photographs(), n_crops, resolution, seed=seed)
    return IRSReference.fit(crops, mode=mode, source=f"skimage.data photographs, {n_crops} random crops, seed {seed}")


def default_reference(resolution: int | tuple[int, int] = 32, n_crops: int = 512, seed: int = 0,
                      mode: str = "two_sided") -> IRSReference:
    """The built-in reference at a resolution: fitted on demand from ``n_crops`` random
    crops of the scikit-image photographs and cached in memory (statistics such as the
    Laplacian variance depend on the image size, so one shipped file could not serve
    every resolution). Threshold: Youden-optimal between the crops and their degraded
    copies (see ``IRSReference.fit``)."""
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    return _default_reference_cached(tuple(int(r) for r in resolution), int(n_crops), int(seed), mode)
