"""Extraction probes: which captions make a diffusion model reproduce a training image?

Five detectors, all over :class:`eidetic.diffusion.DiffusionModel` and all
batched over captions. Every score is "higher = more likely memorized", and every probe
reports the UNet evaluations it spent (``DiffusionModel.unet_evals`` convention: one image
through the network is one evaluation; a classifier-free-guided cond+uncond pair is one).

* :func:`denoising_confidence` — Webster (2023) white-box "denoising confidence": one
  guided denoising step from pure noise at the probe timestep, averaged over a few noise
  draws. ``seeds`` evaluations per caption.
* :func:`edge_consistency` — Webster (2023) black-box score: the one-step image for a few
  seeds, Sobel edges per seed, the fraction of pixels where a majority of seeds agree on
  an edge. Verbatim copies come out sharp and identical across seeds; other captions come
  out as a blurry average. ``seeds`` evaluations per caption.
* :func:`noise_prediction_norm` — Wen et al. (2024): the text-conditional noise
  prediction magnitude ``||eps(x_t, c) - eps(x_t, empty)||_2`` averaged over the first
  few DDIM steps. ``first_steps`` evaluations per caption.
* :func:`anisotropy` — Asthana & Belagiannis (ICLR 2026): the norm of the guidance direction
  at the noisiest step plus its alignment with the unconditional prediction at a low-noise
  step, both on one pure-noise latent. 2 evaluations per caption.
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
    "anisotropy",
    "noise_sigma",
    "probe_timestep",
    "tiled_rms_distance",
    "largest_clique_size",
    "clique_detector",
    "verify_extractions",
    "CopyTest",
    "copy_test",
    "GenerationTruth",
    "generation_ground_truth",
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


def noise_sigma(model: DiffusionModel, timestep: int) -> float:
    """The variance-exploding noise level sigma_t = sqrt((1 - abar_t) / abar_t) of a timestep."""
    a = float(model.alphas_cumprod[int(timestep)])
    return ((1 - a) / a) ** 0.5


def probe_timestep(model: DiffusionModel, sigma: float | None = None) -> int:
    """The timestep a one-step probe starts from: the largest training timestep (``sigma=None``:
    Webster's sigma_max), or the largest one whose sigma_t does not exceed ``sigma``.

    A one-step x0 estimate multiplies any error in the noise prediction by sigma_t, so on a
    schedule whose sigma_max is large (the linear 1e-4..0.02 schedule: ~157, against ~14.6 for
    Stable Diffusion's scaled_linear) the one-step image at T is noise for every caption.
    """
    if sigma is None:
        return _largest_timestep(model)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (Stable Diffusion's sigma_max is ~14.6), got {sigma}")
    a = model.alphas_cumprod.double()
    sigmas = ((1 - a) / a).sqrt()
    below = torch.nonzero(sigmas <= float(sigma)).flatten()
    if below.numel() == 0:
        raise ValueError(f"no training timestep has sigma <= {sigma} (the smallest is {float(sigmas.min()):.3g})")
    return int(below.max())


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


def _pure_noise_input(model: DiffusionModel, z: torch.Tensor, t: int) -> torch.Tensor:
    """Pure noise at level t in the UNet's (variance-preserving) units: sqrt(1 - abar_t) z.

    This is Webster's variance-exploding input sigma_t z (what k-diffusion's Heun sampler
    starts from), rescaled by sqrt(abar_t); at the largest timestep it is z to within 1e-5.
    """
    return (1 - model.alphas_cumprod[t].to(z.device).float()).sqrt() * z


def _one_step(model, captions, z, t, guidance, uncond):
    """(x_t, guided one-step x0 estimate) for every caption under every noise draw in ``z``.

    Rows are seed-major: row ``j * len(captions) + i`` is caption i under draw j.
    """
    seeds, b = z.shape[0], len(captions)
    cond = model.encode_prompt(captions).repeat(seeds, 1, 1)
    x_t = _pure_noise_input(model, z, t).repeat_interleave(b, dim=0)
    eps = model.predict_noise(x_t, t, cond, uncond, guidance)
    x0 = model.predict_x0(x_t, torch.full((x_t.shape[0],), t, device=x_t.device), eps)
    return x_t, x0


# ---- white box: denoising confidence --------------------------------------------------


@torch.no_grad()
def denoising_confidence(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    guidance: float = 7.5,
    seeds: int = 8,
    sigma: float | None = None,
    reference: str = "noise",
    seed: int = 0,
    batch_size: int = 64,
    return_images: bool = False,
) -> ProbeResult:
    """Webster's white-box score: one guided denoising step from pure noise, averaged over seeds.

    Each caption gets the same ``seeds`` pure-noise inputs; one guided step from the probe
    timestep (:func:`probe_timestep`) gives the one-step estimate x0. In Webster's
    variance-exploding units the input is ``sigma z`` and his score (reference code
    ``custom_ksampler_wb_attack.py``: ``((z0 - latents) ** 2).mean()``) is

    * ``reference="noise"`` (faithful, default): ``mean((sigma z - x0)^2)``, averaged over
      ``seeds`` noise draws. It is dominated by ``sigma^2 |z|^2`` and a cross term whose
      spread across captions shrinks with more seeds; a single seed (his released
      configuration) separates memorized captions only where x0 is large against
      ``sigma |z| / sqrt(D)``.
    * ``reference="unconditional"``: ``mean((x0_guided - x0_empty)^2)``, the one-step image
      compared with the empty caption's at the same noise. It equals
      ``guidance^2 sigma^2 ||eps_c - eps_empty||^2 / D``: Wen et al.'s first-step norm,
      squared, times constants — not an independent detector, kept for comparison.

    ``seeds`` evaluations per caption (plus one per seed for the empty caption with
    ``reference="unconditional"``). Scores are in the UNet's space (scaled latents for
    latent models).
    """
    captions = _check_captions(captions)
    batch_size = _check_positive("batch_size", batch_size)
    seeds = _check_positive("seeds", seeds)
    if reference not in ("noise", "unconditional"):
        raise ValueError(f"reference must be 'noise' or 'unconditional', got {reference!r}")
    start = model.unet_evals
    t = probe_timestep(model, sigma)
    sig = noise_sigma(model, t)
    z = _noise(model, seeds, shape, seed)  # (S, C, h, w), shared by all captions
    uncond = model.encode_prompt([""])
    if reference == "unconditional":
        x_empty = _pure_noise_input(model, z, t)
        baseline = model.predict_x0(x_empty, torch.full((seeds,), t, device=z.device), model.predict_noise(x_empty, t, uncond))
    else:
        baseline = sig * z
    per_batch = max(1, batch_size // seeds)
    scores, images = [], []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        _, x0 = _one_step(model, chunk, z, t, guidance, uncond)
        x0 = x0.view(seeds, len(chunk), *x0.shape[1:])
        scores.append(((baseline[:, None] - x0) ** 2).flatten(2).mean(2).mean(0).float().cpu())
        if return_images:
            images.append(model.decode_latents(x0[0]).clamp(-1, 1).float().cpu())
    return ProbeResult(
        name="denoising_confidence",
        captions=captions,
        scores=torch.cat(scores),
        unet_evals=model.unet_evals - start,
        images=torch.cat(images) if return_images else None,
        details={"reference": reference, "timestep": t, "sigma": sig, "guidance": guidance, "seeds": seeds},
    )


# ---- black box: edge consistency ------------------------------------------------------

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(images: torch.Tensor, channel_smoothing: bool = True) -> torch.Tensor:
    """Sobel gradient magnitude of (B, C, H, W) images, summed over channels -> (B, H, W).

    Images on the [0, 1] scale; borders by edge replication (scipy's ``reflect``: a constant
    image has zero magnitude everywhere). With ``channel_smoothing`` (Webster's reference
    code: ``scipy.ndimage.sobel`` on (H, W, 3) arrays smooths every axis it does not
    differentiate with [1, 2, 1], the channel axis included) each channel's gradient is the
    [1, 2, 1]-weighted sum of its own and its neighbours' — 4x a per-channel Sobel on grey
    images. ``channel_smoothing=False`` is the per-channel Sobel.
    """
    if images.ndim != 4:
        raise ValueError(f"sobel_magnitude expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    kx = _SOBEL_X.to(images.device, images.dtype)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    x = F.pad(images.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(x, kernels).view(b, c, 2, h, w)
    if channel_smoothing and c > 1:
        padded = torch.cat([grad[:, :1], grad, grad[:, -1:]], dim=1)  # reflect along channels
        grad = padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]
    return grad.pow(2).sum(2).sqrt().sum(1)


def edge_consistency_of_images(images: torch.Tensor, threshold: float = 1.5, channel_smoothing: bool = True,
                               resize: int | None = None) -> torch.Tensor:
    """Webster's edge-agreement score for (S, B, 3, H, W) images in [-1, 1] (S seeds).

    Per seed (after an optional antialiased resize to ``resize`` px: his images are resized
    to 256 px first), a pixel is an edge when the Sobel magnitude of the [0, 1]-scaled image,
    summed over channels, exceeds ``threshold``; the score is the fraction of pixels that are
    edges for a strict majority of the seeds (his code thresholds the mean edge map with
    ``> 0.5``). Identical sharp images across seeds score their edge density, blurry images
    ~0, independent images only where their edges happen to coincide.
    """
    if images.ndim != 5:
        raise ValueError(f"expected (seeds, batch, C, H, W) images, got shape {tuple(images.shape)}")
    s, b = images.shape[:2]
    scaled = (images.float().flatten(0, 1) + 1) / 2
    if resize is not None and tuple(scaled.shape[-2:]) != (resize, resize):
        scaled = F.interpolate(scaled, size=(resize, resize), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    edges = sobel_magnitude(scaled, channel_smoothing) > threshold  # (S*B, H, W)
    votes = edges.view(s, b, *edges.shape[1:]).float().mean(0)
    return (votes > 0.5).float().flatten(1).mean(1)


@torch.no_grad()
def edge_consistency(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    seeds: int = 4,
    guidance: float = 7.5,
    threshold: float = 1.5,
    sigma: float | None = None,
    channel_smoothing: bool = True,
    resize: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    return_images: bool = False,
) -> ProbeResult:
    """Webster's black-box score: one-step images for ``seeds`` noise draws, edge agreement.

    The one-step image is the guided x0 estimate from pure noise at the probe timestep
    (:func:`probe_timestep`), decoded to pixels; noise draw ``j`` is shared by all captions.
    The defaults are his reference code's (``run_bb_attack.py``: 4 seeds, the pipeline's
    guidance 7.5, ``scipy.ndimage.sobel`` on (H, W, 3) arrays, threshold 1.5); see
    :func:`edge_consistency_of_images`. His code also resizes every image to 256 px, a
    downscale of Stable Diffusion's 512 px images; ``resize=256`` reproduces it, but the default
    analyses images at their own size, since upscaling a small image divides its gradients by
    the scale factor and no edge would pass the threshold. ``seeds`` evaluations per caption.
    """
    captions = _check_captions(captions)
    seeds = _check_positive("seeds", seeds)
    batch_size = _check_positive("batch_size", batch_size)
    start = model.unet_evals
    t = probe_timestep(model, sigma)
    z = _noise(model, seeds, shape, seed)  # (S, C, h, w)
    uncond = model.encode_prompt([""])
    per_batch = max(1, batch_size // seeds)
    scores, images = [], []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        _, x0 = _one_step(model, chunk, z, t, guidance, uncond)
        pixels = model.decode_latents(x0).clamp(-1, 1).float()
        pixels = pixels.view(seeds, len(chunk), *pixels.shape[1:])
        scores.append(edge_consistency_of_images(pixels, threshold, channel_smoothing, resize).cpu())
        if return_images:
            images.append(pixels[0].cpu())
    return ProbeResult(
        name="edge_consistency",
        captions=captions,
        scores=torch.cat(scores),
        unet_evals=model.unet_evals - start,
        images=torch.cat(images) if return_images else None,
        details={"seeds": seeds, "threshold": threshold, "guidance": guidance, "timestep": t, "sigma": noise_sigma(model, t),
                 "channel_smoothing": channel_smoothing, "resize": resize},
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
    guidance: float = 7.5,
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


# ---- Asthana & Belagiannis: anisotropy of the guidance direction -----------------------


@torch.no_grad()
def anisotropy(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    steps: int = 50,
    low_step: int = -3,
    gamma_norm: float = 1.0,
    gamma_cosine: float = 2.0,
    norm_scale: str = "none",
    seeds: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    return_images: bool = False,
) -> ProbeResult:
    """Asthana & Belagiannis (ICLR 2026): norm and alignment of the guidance direction, no denoising.

    On one pure-noise latent z (shared by all captions) and a ``steps``-step DDIM schedule, as
    their reference code (``local_model/pipe.py``, SD1 branch) computes it:

    * (a) the norm ``||eps(z, c) - eps(z, empty)||`` over the whole latent at the first
      (noisiest) timestep of the schedule;
    * (b) the cosine, along the channel axis and averaged over pixels, between ``eps(z, empty)``
      and ``eps(z, c) - eps(z, empty)`` with the same z fed at a low-noise timestep
      (``timesteps[low_step]``, the third from last by default);

    score = ``gamma_norm * (a) + gamma_cosine * (b)`` (their SD1 weights 1 and 2; 1 and 0.1 for
    SD2). The norm grows with the square root of the latent's size while the cosine does not,
    so on a small latent the weights tuned for SD1 let the cosine dominate;
    ``norm_scale="sd1_latent"`` rescales the norm to SD1's 4 x 64 x 64 latent
    (``* sqrt(16384 / D)``) before weighting — a named deviation. The parts are in
    ``details``. Two cond+uncond evaluations per caption and seed.
    """
    captions = _check_captions(captions)
    seeds = _check_positive("seeds", seeds)
    batch_size = _check_positive("batch_size", batch_size)
    start = model.unet_evals
    timesteps = _sampling_scheduler(model, _check_positive("steps", steps)).timesteps
    t_high, t_low = timesteps[0], timesteps[low_step]
    z = _noise(model, seeds, shape, seed)
    uncond = model.encode_prompt([""])
    per_batch = max(1, batch_size // seeds)
    norms, cosines = [], []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        b = len(chunk)
        cond = model.encode_prompt(chunk).repeat(seeds, 1, 1)
        x = z.repeat_interleave(b, dim=0)
        eps_c, eps_u = conditional_and_unconditional_eps(model, x, t_high.to(x.device), cond, uncond)
        norms.append((eps_c - eps_u).float().flatten(1).norm(dim=1).view(seeds, b).mean(0).cpu())
        eps_c, eps_u = conditional_and_unconditional_eps(model, x, t_low.to(x.device), cond, uncond)
        cos = F.cosine_similarity(eps_u.float(), (eps_c - eps_u).float(), dim=1).flatten(1).mean(1)
        cosines.append(cos.view(seeds, b).mean(0).cpu())
    norm, cosine = torch.cat(norms), torch.cat(cosines)
    if norm_scale not in ("none", "sd1_latent"):
        raise ValueError(f"norm_scale must be 'none' or 'sd1_latent', got {norm_scale!r}")
    scale = (16384 / z[0].numel()) ** 0.5 if norm_scale == "sd1_latent" else 1.0
    return ProbeResult(
        name="anisotropy",
        captions=captions,
        scores=gamma_norm * scale * norm + gamma_cosine * cosine,
        unet_evals=model.unet_evals - start,
        details={"norm": norm, "cosine": cosine, "norm_scale": scale, "t_high": int(t_high), "t_low": int(t_low),
                 "gamma_norm": gamma_norm, "gamma_cosine": gamma_cosine, "seeds": seeds},
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


# ---- ground truth by generation -------------------------------------------------------


@dataclass
class CopyTest:
    """Nearest and second-nearest training image of each generation, and the verdict.

    ``copy[i]``: generation i is within ``threshold`` (RMS on the [0, 1] scale) of its nearest
    training image ``nearest[i]`` and the nearest/second-nearest distance ratio is below
    ``ratio`` (Gu et al., TMLR 2025: 1/3), i.e. it is that image, not merely close to the data.
    """

    nearest: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor
    copy: torch.Tensor


def copy_test(images: torch.Tensor, train: torch.Tensor, threshold: float = 0.1, ratio: float = 1 / 3,
              chunk: int = 4096, mirrored: bool = False) -> CopyTest:
    """:class:`CopyTest` of (G, C, H, W) images against (N, C, H, W) training images (N >= 2), both in [-1, 1].

    ``mirrored``: a training image's distance is the nearer of it and its left-right mirror
    (for a model trained with flip augmentation, which saw both), so a mirrored copy counts as
    a copy of that image and an image's own mirror is never its second-nearest neighbour."""
    if train.shape[0] < 2:
        raise ValueError("the nearest/second-nearest test needs at least two training images")

    def distances(block: torch.Tensor) -> torch.Tensor:
        d = _rms_to_all(images, block, None)
        return torch.minimum(d, _rms_to_all(images, block.flip(-1), None)) if mirrored else d

    d = torch.cat([distances(train[s : s + chunk]) for s in range(0, train.shape[0], chunk)], dim=1)
    two = torch.topk(d, 2, dim=1, largest=False)
    d1, d2 = two.values[:, 0], two.values[:, 1]
    copy = (d1 <= threshold) & (d1 < ratio * d2)
    return CopyTest(nearest=two.indices[:, 0], d1=d1, d2=d2, copy=copy)


@dataclass
class GenerationTruth:
    """Per caption: ``copy_rate`` (fraction of its generations that copy some training image),
    ``own_rate`` (fraction that copy the caption's own training image, -1 in ``own`` when it has
    none) and ``copied`` (the training image copied most often, -1 if none)."""

    copy_rate: torch.Tensor
    own_rate: torch.Tensor
    copied: torch.Tensor
    generations: int
    unet_evals: int


@torch.no_grad()
def generation_ground_truth(
    model: DiffusionModel,
    captions: Sequence[str],
    own: Sequence[int],
    train_images: torch.Tensor,
    shape: tuple[int, int],
    crop=None,
    generations: int = 4,
    steps: int = 25,
    guidance: float = 3.0,
    sampler: str = "ddim",
    threshold: float = 0.1,
    ratio: float = 1 / 3,
    seed: int = 0,
    batch_size: int = 256,
    noise_ids: Sequence[int] | None = None,
    mirrored: bool = False,
) -> GenerationTruth:
    """Label captions by what full generations reproduce — independent of every detector.

    ``own[i]`` is the index in ``train_images`` of caption i's own image (-1: none, e.g. a
    held-out caption). ``crop(images) -> images`` maps generations to what is compared (e.g.
    the interior inside a SolidMark border; ``train_images`` are given already cropped).
    Noise is seeded per (caption, generation). ``mirrored``: a left-right mirrored copy counts
    (see :func:`copy_test`; for models trained with flip augmentation).
    """
    captions = _check_captions(captions)
    generations = _check_positive("generations", generations)
    noise_ids = _noise_ids(noise_ids, len(captions))
    start = model.unet_evals
    per_batch = max(1, batch_size // generations)
    rates, own_rates, copied = [], [], []
    for part in _chunks(len(captions), per_batch):
        chunk = captions[part]
        gens = [item_generator(seed, i, g) for i in noise_ids[part] for g in range(generations)]
        out = generate(model, [c for c in chunk for _ in range(generations)], shape=shape, steps=steps, guidance=guidance,
                       generator=gens[0], sampler=sampler, noise=randn_per_item(gens, _latent_shape(model, shape)))
        out = crop(out) if crop is not None else out
        test = copy_test(out.float().cpu(), train_images, threshold, ratio, mirrored=mirrored)
        is_copy, nearest = test.copy.view(len(chunk), generations), test.nearest.view(len(chunk), generations)
        for row, idx, mine in zip(is_copy, nearest, list(own)[part]):
            rates.append(float(row.float().mean()))
            own_rates.append(float((row & (idx == mine)).float().mean()) if mine >= 0 else 0.0)
            hits = idx[row]
            copied.append(int(hits.mode().values) if hits.numel() else -1)
    return GenerationTruth(torch.tensor(rates), torch.tensor(own_rates), torch.tensor(copied), generations, model.unet_evals - start)


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
    "anisotropy": anisotropy,
    "clique": clique_detector,
}
