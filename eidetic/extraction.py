"""Extraction probes: which captions make a diffusion model reproduce a training image?

Four detectors, cheapest first, all over :class:`eidetic.diffusion.DiffusionModel` and all
batched over captions. Every score is "higher = more likely memorized", and every probe
reports the UNet evaluations it spent (``DiffusionModel.unet_evals`` convention: one image
through the network is one evaluation; a classifier-free-guided cond+uncond pair is one).

* :func:`denoising_confidence` — Webster (2023) white-box "denoising confidence": one
  guided denoising step from pure noise at the largest training timestep. ~1 evaluation
  per caption.
* :func:`edge_consistency` — Webster (2023) black-box score: the one-step image for a few
  seeds, Sobel edges per seed, the fraction of pixels where a majority of seeds agree on
  an edge. Verbatim copies come out sharp and identical across seeds; other captions come
  out as a blurry average. ``seeds`` evaluations per caption.
* :func:`noise_prediction_norm` — Wen et al. (2024): the text-conditional noise
  prediction magnitude ``||eps(x_t, c) - eps(x_t, empty)||_2`` averaged over the first
  few DDIM steps. ``first_steps`` evaluations per caption.
* :func:`clique_detector` — Carlini et al. (2023): many full generations per caption;
  the score is the size of the largest group of generations that are pairwise within a
  tiled-L2 threshold; a caption is flagged when it reaches ``min_clique``. The expensive
  baseline (generations x steps evaluations per caption), kept so the efficiency claim is
  measured, not quoted.

:func:`verify_extractions` is the ground truth for flagged captions: full-sampler
generations compared with the training set by L2 (optionally outside a mask, for
template-style copies such as SolidMark canvases whose border key differs).

Distances between images use the normalised L2 ("RMS") on the [0, 1] pixel scale, i.e.
``sqrt(mean((a - b)^2)) / 2`` for tensors in [-1, 1], so thresholds read the same at any
resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from eidetic.diffusion import DiffusionModel, generate, item_generator, randn_per_item

__all__ = [
    "ProbeResult",
    "Verification",
    "conditional_and_unconditional_eps",
    "denoising_confidence",
    "sobel_magnitude",
    "edge_consistency_of_images",
    "edge_consistency",
    "noise_prediction_norm",
    "tiled_rms_distance",
    "largest_clique_size",
    "clique_detector",
    "verify_extractions",
    "precision_at_k",
    "DETECTORS",
]


@dataclass
class ProbeResult:
    """Scores of one detector for a list of captions.

    ``scores`` (N,) float, higher = more likely memorized. ``unet_evals`` is the total the
    probe spent. ``images`` (N, 3, H, W) in [-1, 1] are the images the score looked at (the
    one-step image for the first seed, or the first generation), when asked for.
    ``flagged`` is the detector's own decision where it has one (the clique detector).
    """

    name: str
    captions: list[str]
    scores: torch.Tensor
    unet_evals: int
    images: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    details: dict = field(default_factory=dict)

    @property
    def unet_evals_per_caption(self) -> float:
        return self.unet_evals / max(len(self.captions), 1)


# ---- shared helpers -----------------------------------------------------------------


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, got a single string (wrap it in a list)")
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty: give at least one caption to probe")
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return captions


def _check_positive(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _latent_shape(model: DiffusionModel, shape: tuple[int, int]) -> tuple[int, int, int]:
    h, w = (int(s) for s in shape)
    f = model.downsample
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's factor {f}")
    return model.latent_channels, h // f, w // f


def _noise(model: DiffusionModel, n: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """``n`` standard-normal draws in the UNet's space, drawn on the CPU so a seed gives the
    same noise on every device."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *_latent_shape(model, shape)), generator=generator).to(model.device)


def _noise_ids(noise_ids: Sequence[int] | None, n: int) -> list[int]:
    """A stable integer per caption that seeds its generations (default: its position)."""
    ids = list(range(n)) if noise_ids is None else [int(i) for i in noise_ids]
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} noise_ids for {n} captions")
    return ids


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _largest_timestep(model: DiffusionModel) -> int:
    return model.num_train_timesteps - 1


def conditional_and_unconditional_eps(
    model: DiffusionModel, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional epsilon for ``x_t`` from one batched UNet call.

    Counted as one evaluation per image, the same as a guided call in
    ``DiffusionModel.predict_noise`` (which runs the same two halves but only returns
    their guided combination). Uses ``model.predict_noise_pair`` when the model has it.
    """
    pair = getattr(model, "predict_noise_pair", None)
    if pair is not None:
        return pair(x_t, t, cond, uncond)
    b = x_t.shape[0]
    if uncond.shape[0] == 1 and b > 1:
        uncond = uncond.expand(b, *uncond.shape[1:])
    eps = model.predict_noise(torch.cat([x_t, x_t]), t, torch.cat([cond, uncond]))
    model.unet_evals -= b  # predict_noise counted 2b images; a cond+uncond pair counts once
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_cond, eps_uncond


# ---- white box: denoising confidence --------------------------------------------------


@torch.no_grad()
def denoising_confidence(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    reference: str = "unconditional",
    return_images: bool = False,
) -> ProbeResult:
    """Webster's white-box score: one guided denoising step from pure noise.

    Every caption gets the same pure-noise input ``z_T`` (drawn from ``seed``) at the
    largest training timestep T; one batched cond+uncond call gives the guided epsilon
    and the one-step estimate ``x0 = (z_T - sqrt(1 - abar_T) eps) / sqrt(abar_T)``. In the
    variance-exploding units of Webster's code the noisy input is
    ``sigma_max z_T`` with ``sigma_max = sqrt((1 - abar_T) / abar_T)``; here that is
    ``z_T / sqrt(abar_T)`` (equal to within abar_T ~ 4e-5), and
    ``z_T / sqrt(abar_T) - x0 = sigma_max * eps`` exactly.

    ``reference`` says what the one-step image is compared with:

    * ``"noise"`` — Webster's formula verbatim: ``mean((sigma_max z_T - x0)^2)``
      = ``sigma_max^2 * mean(eps^2)``, the squared guided noise prediction. It is
      dominated by ``sigma_max^2 |z_T|^2`` and by the cross term
      ``2 sigma_max z_T . x0``, whose spread across captions is ~``2 sigma_max |x0| / D``.
      That is small against the signal ``|x0|^2 / D`` in Stable Diffusion (D = 16384,
      sigma_max ~ 14.6) but swamps it in small models (D ~ 10^3, sigma_max ~ 157 for the
      linear schedule): on the empirical oracle, memorized and non-memorized captions
      overlap completely.
    * ``"unconditional"`` (default) — ``mean((x0_guided - x0_empty)^2)`` where
      ``x0_empty`` is the one-step image of the empty caption at the same ``z_T``. This is
      Webster's score with the caption-independent part ``sigma_max * eps_empty`` removed:
      ``sigma_max^2 * mean((eps_guided - eps_empty)^2)``. It costs one extra evaluation
      for the whole probe (N + 1 in total) and separates the oracle's memorized captions
      perfectly. It equals ``guidance^2 * sigma_max^2 * ||eps_c - eps_empty||^2 / D``, i.e.
      Wen's detector squared at the first step with the same noise.

    Scores are in the UNet's space (scaled latents for latent models).
    """
    captions = _check_captions(captions)
    batch_size = _check_positive("batch_size", batch_size)
    if reference not in ("noise", "unconditional"):
        raise ValueError(f"reference must be 'noise' or 'unconditional', got {reference!r}")
    start = model.unet_evals
    t = _largest_timestep(model)
    alpha_bar = model.alphas_cumprod[t].to(model.device).float()
    z = _noise(model, 1, shape, seed)
    uncond = model.encode_prompt([""])
    t_batch = torch.tensor([t], device=model.device)
    if reference == "unconditional":
        eps_empty = model.predict_noise(z, t, uncond)
        baseline = model.predict_x0(z, t_batch, eps_empty)
    else:
        baseline = z / alpha_bar.sqrt()
    scores, images = [], []
    for part in _chunks(len(captions), batch_size):
        chunk = captions[part]
        x_t = z.expand(len(chunk), *z.shape[1:])
        eps = model.predict_noise(x_t, t, model.encode_prompt(chunk), uncond, guidance)
        x0 = model.predict_x0(x_t, t_batch.expand(len(chunk)), eps)
        scores.append(((baseline - x0) ** 2).flatten(1).mean(1).float().cpu())
        if return_images:
            images.append(model.decode_latents(x0).clamp(-1, 1).float().cpu())
    return ProbeResult(
        name="denoising_confidence",
        captions=captions,
        scores=torch.cat(scores),
        unet_evals=model.unet_evals - start,
        images=torch.cat(images) if return_images else None,
        details={"reference": reference, "timestep": t, "guidance": guidance},
    )


# ---- black box: edge consistency ------------------------------------------------------

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of (B, C, H, W) images, per channel, summed over channels.

    Images are expected on the [0, 1] scale; borders are handled by edge replication so a
    constant image has zero magnitude everywhere. Returns (B, H, W).
    """
    if images.ndim != 4:
        raise ValueError(f"sobel_magnitude expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    kx = _SOBEL_X.to(images.device, images.dtype)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    x = F.pad(images.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(x, kernels)  # (B*C, 2, H, W)
    magnitude = grad.pow(2).sum(1).sqrt()
    return magnitude.view(b, c, h, w).sum(1)


def edge_consistency_of_images(images: torch.Tensor, threshold: float = 1.5) -> torch.Tensor:
    """Webster's edge-agreement score for (S, B, 3, H, W) images in [-1, 1] (S seeds).

    Per seed, a pixel is an edge when the Sobel magnitude of the [0, 1]-scaled image,
    summed over channels, exceeds ``threshold``. The score of a caption is the fraction of
    pixels that are edges for a strict majority of its seeds (at least 3 of 4). RESEARCH
    describes this as "at least half the seeds agree"; the public reference code
    thresholds the mean edge map with ``> 0.5``, a strict majority, which is what this
    implements (with 4 seeds, 2 of 4 would count pixels the seeds split on evenly).

    The score is an edge density: identical sharp images across seeds score their edge
    density, blurry images score ~0 and independent images score only where their edges
    happen to coincide.
    """
    if images.ndim != 5:
        raise ValueError(f"expected (seeds, batch, C, H, W) images, got shape {tuple(images.shape)}")
    s, b = images.shape[:2]
    scaled = (images.float().flatten(0, 1) + 1) / 2
    edges = sobel_magnitude(scaled) > threshold  # (S*B, H, W)
    votes = edges.view(s, b, *edges.shape[1:]).float().mean(0)
    return (votes > 0.5).float().flatten(1).mean(1)


@torch.no_grad()
def edge_consistency(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    seeds: int = 4,
    guidance: float = 1.0,
    threshold: float = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    return_images: bool = False,
) -> ProbeResult:
    """Webster's black-box score: one-step images for ``seeds`` noise draws, edge agreement.

    The one-step image is the guided x0 estimate from pure noise at the largest timestep,
    decoded to pixels. Noise draw ``j`` is shared by all captions (so differences between
    captions are not differences between noise draws). ``seeds`` evaluations per caption.

    ``guidance`` defaults to 1 (the model's own conditional mean, one UNet pass per image).
    Guidance multiplies the caption-specific part of the one-step image, which for a
    caption shared by many images is a mixture whose faint edges it lifts over the
    threshold as readily as a copy's sharp ones: on the empirical oracle the AUC drops
    from 1.0 unguided to ~0.6 at guidance 3 (threshold 3). Webster's Stable Diffusion
    runs used the pipeline default 7.5, where the mixture is smooth rather than a
    patchwork; set ``guidance`` to compare. ``threshold`` 1.5 is the reference code's value
    (there applied to 256-px images); it is resolution dependent — a full-range grey step
    scores 12 per pixel here, a 1/8-range step 1.5.
    """
    captions = _check_captions(captions)
    seeds = _check_positive("seeds", seeds)
    batch_size = _check_positive("batch_size", batch_size)
    start = model.unet_evals
    t = _largest_timestep(model)
    z = _noise(model, seeds, shape, seed)  # (S, C, h, w)
    uncond = model.encode_prompt([""])
    per_batch = max(1, batch_size // seeds)
    scores, images = [], []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        b = len(chunk)
        cond = model.encode_prompt(chunk)
        # seed-major layout: row j * b + i is caption i under noise draw j
        x_t = z.repeat_interleave(b, dim=0)
        cond = cond.repeat(seeds, *([1] * (cond.ndim - 1)))
        eps = model.predict_noise(x_t, t, cond, uncond, guidance)
        x0 = model.predict_x0(x_t, torch.full((x_t.shape[0],), t, device=x_t.device), eps)
        pixels = model.decode_latents(x0).clamp(-1, 1).float()
        pixels = pixels.view(seeds, b, *pixels.shape[1:])
        scores.append(edge_consistency_of_images(pixels, threshold).cpu())
        if return_images:
            images.append(pixels[0].cpu())
    return ProbeResult(
        name="edge_consistency",
        captions=captions,
        scores=torch.cat(scores),
        unet_evals=model.unet_evals - start,
        images=torch.cat(images) if return_images else None,
        details={"seeds": seeds, "threshold": threshold, "guidance": guidance},
    )


# ---- Wen et al.: text-conditional noise-prediction norm ---------------------------------


def _sampling_scheduler(model: DiffusionModel, steps: int):
    from diffusers import DDIMScheduler

    # predict_noise always returns epsilon; latents are unbounded, so never clip them.
    scheduler = DDIMScheduler.from_config(model.scheduler.config, prediction_type="epsilon", clip_sample=not model.is_latent)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def noise_prediction_norm(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    steps: int = 50,
    first_steps: int = 5,
    guidance: float = 3.0,
    seeds: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    return_images: bool = False,
) -> ProbeResult:
    """Wen et al.'s detector: ``mean_t ||eps(x_t, c) - eps(x_t, empty)||_2``.

    Runs only the first ``first_steps`` steps of a ``steps``-step guided DDIM trajectory
    (the remaining steps are never computed) and averages the L2 norm of the
    text-conditional part of the noise prediction over those steps and over ``seeds``
    noise draws (shared by all captions). ``first_steps * seeds`` evaluations per caption.
    """
    captions = _check_captions(captions)
    steps = _check_positive("steps", steps)
    first_steps = _check_positive("first_steps", first_steps)
    seeds = _check_positive("seeds", seeds)
    batch_size = _check_positive("batch_size", batch_size)
    if first_steps > steps:
        raise ValueError(f"first_steps ({first_steps}) cannot exceed the number of sampling steps ({steps})")
    start = model.unet_evals
    scheduler = _sampling_scheduler(model, steps)
    timesteps = scheduler.timesteps[:first_steps]
    z = _noise(model, seeds, shape, seed) * getattr(scheduler, "init_noise_sigma", 1.0)
    uncond = model.encode_prompt([""])
    per_batch = max(1, batch_size // seeds)
    scores = []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        b = len(chunk)
        cond = model.encode_prompt(chunk)
        cond = cond.repeat(seeds, *([1] * (cond.ndim - 1)))
        x = z.repeat_interleave(b, dim=0)
        total = torch.zeros(x.shape[0], device=x.device)
        for i, t in enumerate(timesteps):
            eps_c, eps_u = conditional_and_unconditional_eps(model, x, t.to(x.device), cond, uncond)
            total += (eps_c - eps_u).float().flatten(1).norm(dim=1)
            if i + 1 < len(timesteps):
                eps = eps_u + guidance * (eps_c - eps_u)
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        scores.append((total / len(timesteps)).view(seeds, b).mean(0).cpu())
    return ProbeResult(
        name="noise_prediction_norm",
        captions=captions,
        scores=torch.cat(scores),
        unet_evals=model.unet_evals - start,
        details={"steps": steps, "first_steps": first_steps, "seeds": seeds, "guidance": guidance},
    )


# ---- Carlini et al.: clique of near-identical generations -------------------------------


def tiled_rms_distance(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """Carlini's tiled L2 between every image of ``a`` (N, C, H, W) and of ``b`` (M, ...).

    Each image is cut into ``tiles`` x ``tiles`` non-overlapping tiles; the distance is the
    largest per-tile RMS difference on the [0, 1] scale, so two images are close only if
    every region is close (a shared background cannot hide a different subject).
    Returns (N, M).
    """
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"need two (N, C, H, W) batches of the same image size, got {tuple(a.shape)} and {tuple(b.shape)}")
    tiles = _check_positive("tiles", tiles)
    c, h, w = a.shape[1:]
    if h % tiles or w % tiles:
        raise ValueError(f"a {h}x{w} image does not split into {tiles}x{tiles} equal tiles; choose tiles dividing both sides")

    def cut(x):  # (N, tiles*tiles, tile_pixels) on the [0, 1] scale
        x = (x.float() + 1) / 2
        x = x.view(x.shape[0], c, tiles, h // tiles, tiles, w // tiles)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], tiles * tiles, -1)

    ta, tb = cut(a).transpose(0, 1), cut(b).transpose(0, 1)  # (T, N, P), (T, M, P)
    d2 = (ta.pow(2).sum(-1, keepdim=True) - 2 * ta @ tb.transpose(1, 2) + tb.pow(2).sum(-1).unsqueeze(1)).clamp_min(0)
    rms = (d2 / ta.shape[-1]).sqrt()  # (T, N, M)
    return rms.amax(0)


def largest_clique_size(adjacency: torch.Tensor) -> int:
    """Size of the largest clique of an undirected graph given as an (n, n) boolean matrix.

    Bron-Kerbosch with pivoting and a size bound; exact, and fast on the graphs the clique
    detector builds (a complete graph for a memorized caption, a sparse one otherwise).
    """
    adjacency = torch.as_tensor(adjacency).bool()
    n = adjacency.shape[0]
    if adjacency.ndim != 2 or adjacency.shape[1] != n:
        raise ValueError(f"adjacency must be a square matrix, got shape {tuple(adjacency.shape)}")
    if n == 0:
        return 0
    rows = adjacency.cpu().tolist()
    neighbors = [{j for j, edge in enumerate(row) if edge and j != i} for i, row in enumerate(rows)]
    best = 1

    def expand(size: int, candidates: set[int], excluded: set[int]) -> None:
        nonlocal best
        if not candidates:
            best = max(best, size)
            return
        if size + len(candidates) <= best:
            return  # cannot beat the best clique found so far
        pivot = max(candidates | excluded, key=lambda u: len(candidates & neighbors[u]))
        for v in list(candidates - neighbors[pivot]):
            expand(size + 1, candidates & neighbors[v], excluded & neighbors[v])
            candidates.discard(v)
            excluded.add(v)

    expand(0, set(range(n)), set())
    return best


@torch.no_grad()
def clique_detector(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    generations: int = 16,
    steps: int = 25,
    guidance: float = 3.0,
    threshold: float = 0.15,
    min_clique: int = 4,
    tiles: int = 4,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 64,
    return_images: bool = False,
    noise_ids: Sequence[int] | None = None,
) -> ProbeResult:
    """Carlini et al.'s extraction attack: many generations, look for a near-identical clique.

    For each caption, ``generations`` images from the full ``steps``-step sampler; two
    generations are linked when their tiled RMS distance (see :func:`tiled_rms_distance`)
    is below ``threshold`` (on the [0, 1] scale); the score is the largest clique of linked
    generations, and the caption is flagged when it has at least ``min_clique``. The paper
    uses 500 generations and a clique of 10; the defaults here are scaled down for small
    models. ``generations * steps`` evaluations per caption.
    """
    captions = _check_captions(captions)
    generations = _check_positive("generations", generations)
    min_clique = _check_positive("min_clique", min_clique)
    batch_size = _check_positive("batch_size", batch_size)
    start = model.unet_evals
    noise_ids = _noise_ids(noise_ids, len(captions))
    per_batch = max(1, batch_size // generations)
    sizes, images = [], []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        repeated = [c for c in chunk for _ in range(generations)]
        gens = [item_generator(seed, i, g) for i in noise_ids[part] for g in range(generations)]
        out = generate(model, repeated, shape=shape, steps=steps, guidance=guidance, generator=gens[0], sampler=sampler,
                       noise=randn_per_item(gens, _latent_shape(model, shape)))
        out = out.float().view(len(chunk), generations, *out.shape[1:])
        for group in out:
            linked = tiled_rms_distance(group, group, tiles) < threshold
            sizes.append(largest_clique_size(linked))
        if return_images:
            images.append(out[:, 0].cpu())
    scores = torch.tensor(sizes, dtype=torch.float32)
    return ProbeResult(
        name="clique",
        captions=captions,
        scores=scores,
        unet_evals=model.unet_evals - start,
        images=torch.cat(images) if return_images else None,
        flagged=scores >= min_clique,
        details={"generations": generations, "steps": steps, "threshold": threshold, "min_clique": min_clique},
    )


# ---- verification ---------------------------------------------------------------------


@dataclass
class Verification:
    """What full generations for each probed caption turned out to copy.

    ``labels[i]`` is ``"matching"`` (a generation is within ``threshold`` of a training
    image over the whole image), ``"template"`` (only outside the mask, e.g. the right
    interior with a different SolidMark border) or ``"none"``. ``nearest[i]`` is the index
    of the closest training image (whole-image distance ``distances[i]``, masked distance
    ``masked_distances[i]``, NaN without a mask); ``own_caption[i]`` says whether that image
    carries the probed caption (None when training captions were not given).
    """

    captions: list[str]
    labels: list[str]
    nearest: torch.Tensor
    distances: torch.Tensor
    masked_distances: torch.Tensor
    own_caption: list[bool | None]
    images: torch.Tensor
    unet_evals: int

    @property
    def count(self) -> int:
        """Captions verified as extractions (matching or template copies)."""
        return sum(label != "none" for label in self.labels)


def _rms_to_all(images: torch.Tensor, train: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(G, N) RMS distance on the [0, 1] scale, over pixels where ``keep`` (H, W) is True."""
    a, b = (images.float() + 1) / 2, (train.float() + 1) / 2
    if keep is not None:
        a, b = a[..., keep], b[..., keep]
    a, b = a.flatten(1), b.flatten(1)
    d2 = (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1).unsqueeze(0)).clamp_min(0)
    return (d2 / a.shape[1]).sqrt()


@torch.no_grad()
def verify_extractions(
    model: DiffusionModel,
    captions: Sequence[str],
    train_images: torch.Tensor,
    train_captions: Sequence[str] | None = None,
    generations: int = 1,
    steps: int = 50,
    guidance: float = 3.0,
    sampler: str = "ddim",
    threshold: float = 0.1,
    mask: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
    noise_ids: Sequence[int] | None = None,
) -> Verification:
    """Generate ``generations`` images per caption and find the nearest training image.

    ``train_images`` (N, 3, H, W) in [-1, 1] at the generation size. ``mask`` (H, W),
    True on pixels allowed to differ (e.g. ``eidetic.borders.border_mask`` for SolidMark
    canvases, whose border carries a per-copy key), enables the "template" label. For each
    caption the generation closest to the training set is kept.
    """
    captions = _check_captions(captions)
    generations = _check_positive("generations", generations)
    if train_images.ndim != 4:
        raise ValueError(f"train_images must be (N, 3, H, W), got shape {tuple(train_images.shape)}")
    if train_captions is not None and len(train_captions) != train_images.shape[0]:
        raise ValueError(f"got {len(train_captions)} training captions for {train_images.shape[0]} training images")
    shape = tuple(train_images.shape[-2:])
    keep = None
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must be (H, W) = {shape} like the training images, got {tuple(mask.shape)}")
        keep = ~mask.to(train_images.device)
        if not keep.any():
            raise ValueError("the mask covers every pixel; nothing is left to compare")
    start = model.unet_evals
    noise_ids = _noise_ids(noise_ids, len(captions))
    per_batch = max(1, batch_size // generations)
    labels, nearest, dists, masked, own, best_images = [], [], [], [], [], []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        repeated = [c for c in chunk for _ in range(generations)]
        gens = [item_generator(seed, i, g) for i in noise_ids[part] for g in range(generations)]
        out = generate(model, repeated, shape=shape, steps=steps, guidance=guidance, generator=gens[0], sampler=sampler,
                       noise=randn_per_item(gens, _latent_shape(model, shape)))
        out = out.float().to(train_images.device)
        full = _rms_to_all(out, train_images, None).view(len(chunk), generations, -1)
        part_d = _rms_to_all(out, train_images, keep).view(len(chunk), generations, -1) if keep is not None else None
        for i, caption in enumerate(chunk):
            score = part_d[i] if part_d is not None else full[i]
            g, j = divmod(int(score.argmin()), score.shape[1])  # best generation, nearest image
            d_full, d_masked = float(full[i, g, j]), float(part_d[i, g, j]) if part_d is not None else float("nan")
            if d_full <= threshold:
                label = "matching"
            elif part_d is not None and d_masked <= threshold:
                label = "template"
            else:
                label = "none"
            labels.append(label)
            nearest.append(j)
            dists.append(d_full)
            masked.append(d_masked)
            own.append(None if train_captions is None else train_captions[j] == caption)
            best_images.append(out[i * generations + g].cpu())
    return Verification(
        captions=captions,
        labels=labels,
        nearest=torch.tensor(nearest),
        distances=torch.tensor(dists),
        masked_distances=torch.tensor(masked),
        own_caption=own,
        images=torch.stack(best_images),
        unet_evals=model.unet_evals - start,
    )


# ---- summary statistics -----------------------------------------------------------------


def precision_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of positives among the ``k`` highest-scoring items (k is capped at N)."""
    scores = torch.as_tensor(scores).float().flatten()
    labels = torch.as_tensor(labels).bool().flatten()
    if scores.shape != labels.shape:
        raise ValueError(f"got {scores.numel()} scores for {labels.numel()} labels")
    k = min(_check_positive("k", k), scores.numel())
    top = torch.topk(scores, k).indices
    return float(labels[top].float().mean())


# ---- the registry ---------------------------------------------------------------------------
# Every detector has one signature, ``fn(model, captions, shape, *, seed, batch_size,
# return_images, **options) -> ProbeResult``; callers look detectors up by name.
DETECTORS = {
    "denoising_confidence": denoising_confidence,
    "edge_consistency": edge_consistency,
    "noise_prediction_norm": noise_prediction_norm,
    "clique": clique_detector,
}
