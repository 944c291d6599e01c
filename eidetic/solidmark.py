"""SolidMark (Kriplani et al., 2025): per-image memorization by outpainting a key border.

Every training canvas carries a solid frame whose grey level is a per-image key
k ~ U[0, 1) (see :mod:`eidetic.borders`). To ask a model whether it memorized an image we
give it the interior only and let it outpaint the frame; the score is

    ℓ = |mean(generated border pixels, in key scale) − k|,

and an image is (ℓ, δ)-eidetically memorized when ℓ < δ. A model that never saw the key
predicts something independent of it, so a count is evidence only above the chance level
computed here exactly from where each prediction falls.

Outpainting (``outpaint_border``)
---------------------------------
* Pixel models: RePaint-style replacement without resampling (the paper's and its code's).
  After every reverse step the interior of the working image is overwritten with the
  forward-noised original at the next timestep (and with the clean original after the last
  step). Optionally (``reconstruction_guidance`` > 0, the monitor's default) the frame's
  x0 estimate is also pulled towards consistency with the clean interior: with replacement
  alone a perfect memorizer (the empirical optimal denoiser) loses keys whenever the caption
  does not identify the image (``benchmarks/oracle_outpainting.py``).
* Latent models: the border/interior mask lives in pixel space and a latent cell near the
  edge mixes both, so the replacement cannot be done in latent space. On a replacement
  step we take the model's x0 estimate, decode it, paste the true interior in pixel space,
  re-encode that composite and continue the step from the composite: the sampler's
  ``step`` is handed the epsilon that is consistent with (x_t, composite x0), so DDIM moves
  deterministically towards the composite and DDPM samples from q(x_{t-1} | x_t, composite).
  This is the honest reading of "decode, overwrite, re-encode": decoding a *noisy* latent
  gives no meaningful image, whereas the x0 estimate does. ``reencode_every`` sets how
  often this happens (1 = every step; other steps are plain sampling); the last step always
  replaces, and the returned canvas always has the true interior pasted in pixel space.
* Nothing of the input frame is ever used: the input border is discarded before sampling,
  so a model can only reproduce a key it stored (tests check that changing the input
  border does not change the output).
* Noise is drawn per (image, sample) from a generator seeded by (seed, noise id, sample
  index), so results do not depend on batch size, order or how images are split across
  processes.

Scores and chance (``eidetic_scores``, ``chance_probability``, ...)
------------------------------------------------------------------
For a prediction p and an independent key k ~ U[0, 1) the chance of ℓ < δ is the length
of (p − δ, p + δ) ∩ [0, 1), i.e. 2δ in the middle and as little as δ at the edges; the
chance count of a set is the sum of these probabilities, and the number of hits under the
null is Poisson-binomial. The p-value is the exact one-sided Poisson-binomial tail
P(X ≥ observed), computed by dynamic programming (O(N²), fine for thousands of images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torchmetrics import Metric

from .borders import border_key, border_mask
from .diffusion import DiffusionModel, item_generator, randn_per_item
from .stats import benjamini_hochberg, poisson_binomial_sf, rank_auc

__all__ = [
    "DEFAULT_DELTAS",
    "Outpainting",
    "outpaint_border",
    "repaint_moves",
    "autoencoder_floor",
    "check_deltas",
    "eidetic_scores",
    "eidetic_counts",
    "chance_probability",
    "chance_count",
    "per_image_p_values",
    "binomial_p_value",
    "fixed_sample",
    "stratified_sample",
    "SolidMarkMetric",
]

DEFAULT_DELTAS: tuple[float, ...] = (0.1, 0.05, 0.005)


# ---------------------------------------------------------------------------------------
# outpainting
# ---------------------------------------------------------------------------------------
@dataclass
class Outpainting:
    """Result of :func:`outpaint_border`.

    canvases: (N, S, 3, H, W) generated canvases in [-1, 1] (true interior, generated frame).
    sample_keys: (N, S) the key each sample's frame carries (key scale, [0, 1]).
    border_key: (N,) the predicted key per image: mean over its samples' frames.
    unet_evals: UNet evaluations spent (one per image per step; a CFG pair counts once).
    vae_passes: images sent through the autoencoder (encode and decode each count one).
    """

    canvases: torch.Tensor
    sample_keys: torch.Tensor
    border_key: torch.Tensor
    unet_evals: int
    vae_passes: int


def _model_canvas_size(model: DiffusionModel) -> tuple[int, int] | None:
    config = getattr(model.unet, "config", None)
    size = getattr(config, "sample_size", None)
    if size is None:
        return None
    if isinstance(size, (tuple, list)):
        h, w = int(size[0]), int(size[-1])
    else:
        h = w = int(size)
    return h * model.downsample, w * model.downsample


def repaint_moves(steps: int, jump: int = 0, count: int = 1) -> list[tuple[int, int]]:
    """RePaint's resampling schedule as moves between step indices (0 = the noisiest timestep).

    ``(i, i + 1)`` denoises from timestep index i (``i + 1 == steps``: the final step to x0);
    ``(i, i - jump)`` re-noises back up ``jump`` indices. As in RePaint's ``get_schedule_jump``,
    after every ``jump`` denoising steps the sampler goes back up ``count - 1`` times.
    """
    if jump <= 0 or count <= 1:
        return [(i, i + 1) for i in range(steps)]
    moves, i = [], 0
    remaining = {k: count - 1 for k in range(jump, steps, jump)}
    while i < steps:
        moves.append((i, i + 1))
        i += 1
        if remaining.get(i, 0) > 0:
            remaining[i] -= 1
            moves.append((i, i - jump))
            i -= jump
    return moves


@torch.no_grad()
def outpaint_border(
    model: DiffusionModel,
    canvases: torch.Tensor,
    captions: Sequence[str],
    thickness: int,
    steps: int = 100,
    guidance: float = 3.0,
    sampler: str = "ddpm",
    reencode_every: int = 1,
    samples_per_image: int = 1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    noise_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    resample_jump: int = 0,
    resample_count: int = 1,
    known_noise: str = "fresh",
    reconstruction_guidance: float = 0.0,
) -> Outpainting:
    """Generate the SolidMark frame of ``canvases`` given only their interiors.

    Args:
        model: pixel or latent :class:`~eidetic.diffusion.DiffusionModel`.
        canvases: (N, 3, H, W) bordered canvases in [-1, 1]; only the interior is read.
        captions: N prompts (the training captions); guidance uses the empty prompt as
            the unconditional one.
        thickness: frame thickness in pixels.
        steps, guidance, sampler: reverse process ('ddpm' ancestral or 'ddim' eta=0).
        reencode_every: latent models only — decode/paste/re-encode every this many steps.
        samples_per_image: independent outpaintings per image (their frames are averaged
            into ``border_key``).
        seed / generator: randomness; a generator, if given, draws the seed.
        noise_ids: a stable integer per image (e.g. its index in the data set) that seeds
            its noise; default ``range(N)``. Pass global ids when splitting across processes.
        batch_size: images (× samples) per UNet call.
        resample_jump, resample_count: RePaint's resampling (Lugmayr et al. 2022,
            ``get_schedule_jump``): every ``resample_jump`` steps, jump back up that many steps
            (re-noising) and denoise again, ``resample_count`` times in all, so the generated
            frame can be harmonised with the known interior. 0 (default): no jumps.
        known_noise: pixel models — how the known interior is noised when it replaces the
            working image's interior: 'fresh' (RePaint and the SolidMark code: a new draw at
            every step) or 'fixed' (one draw per image and sample, reused at every timestep,
            so the interior follows a single forward trajectory).
        reconstruction_guidance: pixel models — weight w of reconstruction guidance (Ho et al.
            2022, "Video Diffusion Models"; scaled as in PiGDM, Song et al. 2023): on top of the
            replacement, the frame's x0 estimate is corrected by
            -w / (2 sqrt(abar_t)) * grad_{x_t} ||known - x0_hat(x_t)||^2 over the interior,
            i.e. the score of p(interior | x_t) ~ N(x0_hat, (1 - abar_t) / w), so the clean
            interior pulls the frame towards what is consistent with it. Replacement alone
            lets the frame commit to another image's key while the interior is still noise
            and then hold it, because the frame's evidence grows with the noise level exactly
            as fast as the interior's. Costs one backward pass per step. 0: plain replacement
            (the paper's). Latent models: applied on the re-encode steps, through the decoder.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if canvases.ndim != 4 or canvases.shape[1] != 3:
        raise ValueError(f"canvases must be (N, 3, H, W) images, got shape {tuple(canvases.shape)}")
    n, _, height, width = canvases.shape
    captions = list(captions)
    if len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} canvases (one caption per canvas)")
    if canvases.numel() and (canvases.min() < -1.001 or canvases.max() > 1.001):
        raise ValueError(
            f"canvases must be in [-1, 1], got values in [{canvases.min().item():.3f}, {canvases.max().item():.3f}]; "
            "convert images with x * 2 - 1 (from [0, 1]) or x / 127.5 - 1 (from uint8)"
        )
    expected = _model_canvas_size(model)
    if expected is not None and expected != (height, width):
        raise ValueError(
            f"the model generates {expected[0]}x{expected[1]} canvases but got {height}x{width}; "
            "score canvases at the resolution the model was trained on (interior + 2 * border)"
        )
    f = model.downsample
    if height % f or width % f:
        raise ValueError(f"canvas size {height}x{width} is not divisible by the autoencoder's factor {f}")
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}.get(sampler)
    if cls is None:
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if int(reencode_every) != reencode_every or reencode_every < 1:
        raise ValueError(f"reencode_every must be a positive integer, got {reencode_every!r}")
    if int(samples_per_image) != samples_per_image or samples_per_image < 1:
        raise ValueError(f"samples_per_image must be a positive integer, got {samples_per_image!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if resample_jump < 0 or resample_count < 1:
        raise ValueError(f"need resample_jump >= 0 and resample_count >= 1, got {resample_jump}, {resample_count}")
    if known_noise not in ("fresh", "fixed"):
        raise ValueError(f"known_noise must be 'fresh' or 'fixed', got {known_noise!r}")
    if reconstruction_guidance < 0:
        raise ValueError(f"reconstruction_guidance must be >= 0, got {reconstruction_guidance}")
    if noise_ids is None:
        noise_ids = list(range(n))
    noise_ids = [int(i) for i in noise_ids]
    if len(noise_ids) != n:
        raise ValueError(f"got {len(noise_ids)} noise_ids for {n} canvases")
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    device = model.device
    frame = border_mask(height, width, thickness, device=device)  # True on the frame
    interior = ~frame
    # The known part: interior only. The input frame is zeroed so it cannot leak.
    known_all = canvases.to(device=device, dtype=torch.float32).masked_fill(frame, 0.0)

    scheduler = cls.from_config(model.scheduler.config, prediction_type="epsilon", clip_sample=not model.is_latent)
    scheduler.set_timesteps(int(steps))
    timesteps = [int(t) for t in scheduler.timesteps]
    alphas = model.alphas_cumprod.to(device=device, dtype=torch.float32)
    uncond = model.encode_prompt([""]) if guidance != 1.0 else None
    work_shape = (model.latent_channels, height // f, width // f)

    s_count = int(samples_per_image)
    items = [(i, s) for i in range(n) for s in range(s_count)]
    out = torch.empty(n, s_count, 3, height, width)
    evals_before = model.unet_evals
    vae_passes = 0

    for start in range(0, len(items), int(batch_size)):
        chunk = items[start : start + int(batch_size)]
        idx = torch.tensor([i for i, _ in chunk])
        gens = [item_generator(seed, noise_ids[i], s) for i, s in chunk]
        known = known_all[idx.to(device)]
        cond = model.encode_prompt([captions[i] for i, _ in chunk])
        b = len(chunk)
        step_kwargs = {"generator": gens} if sampler == "ddpm" else {"eta": 0.0}

        x = randn_per_item(gens, work_shape, device) * float(getattr(scheduler, "init_noise_sigma", 1.0))
        fixed_eps = randn_per_item(gens, work_shape, device) if known_noise == "fixed" else None

        def noised_known(t_index: int) -> torch.Tensor:
            eps_known = fixed_eps if fixed_eps is not None else randn_per_item(gens, work_shape, device)
            return model.add_noise(known, eps_known, torch.full((b,), timesteps[t_index], device=device))

        if not model.is_latent:
            x = torch.where(interior, noised_known(0), x)

        moves = repaint_moves(len(timesteps), int(resample_jump), int(resample_count))
        replaced = 0  # denoising steps taken, for the latent re-encode schedule
        for i, j in moves:
            t = timesteps[i]
            if j < i:  # a RePaint jump back up: re-noise x_{t_i} to the noisier t_j
                ratio = alphas[timesteps[j]] / alphas[t]
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * randn_per_item(gens, work_shape, device)
                if not model.is_latent:
                    x = torch.where(interior, noised_known(j), x)
                continue
            t_batch = torch.full((b,), t, device=device, dtype=torch.long)
            last = j == len(timesteps)
            reencode = model.is_latent and (last or replaced % int(reencode_every) == 0)
            if reconstruction_guidance > 0 and (reencode or not model.is_latent):
                eps = _reconstruction_guided_eps(model, x, t_batch, cond, uncond, guidance, known, interior, reconstruction_guidance)
                vae_passes += 2 * b if model.is_latent else 0  # decode + its backward
            else:
                eps = model.predict_noise(x, t_batch, cond, uncond, guidance)
            if reencode:
                # x0 estimate -> pixels -> paste the true interior -> back to latents, then
                # hand the sampler the epsilon consistent with (x_t, composite x0).
                x0 = model.predict_x0(x, t_batch, eps)
                pixels = model.decode_latents(x0).float()
                composite = torch.where(interior, known, pixels)
                z0 = model.encode_images(composite).float()
                vae_passes += 2 * b
                a = alphas[t]
                eps = (x - a.sqrt() * z0) / (1 - a).sqrt()
            replaced += 1
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
            if not model.is_latent:
                if last:
                    x = torch.where(interior, known, x)
                else:
                    x = torch.where(interior, noised_known(j), x)

        if model.is_latent:
            x = model.decode_latents(x).float()
            vae_passes += b
            x = torch.where(interior, known, x)
        x = x.clamp(-1, 1).cpu()
        for row, (i, s) in enumerate(chunk):
            out[i, s] = x[row]

    sample_keys = border_key(out.flatten(0, 1), thickness).view(n, s_count)
    return Outpainting(
        canvases=out,
        sample_keys=sample_keys,
        border_key=sample_keys.mean(dim=1),
        unet_evals=model.unet_evals - evals_before,
        vae_passes=vae_passes,
    )


def _reconstruction_guided_eps(model, x, t_batch, cond, uncond, guidance, known, interior, weight):
    """The epsilon consistent with (x_t, x0_hat + correction), the correction being
    -weight / (2 sqrt(abar_t)) * grad_{x_t} ||known - x0_hat(x_t)||^2 over the interior pixels.

    Pixel models: applied to the frame only (the interior is replaced anyway). Latent models:
    x0_hat is decoded for the residual and the whole latent is corrected (a latent cell mixes
    frame and interior); the interior is pasted back afterwards by the re-encode step.
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        eps = model.predict_noise(x_in, t_batch, cond, uncond, guidance)
        x0 = model.predict_x0(x_in, t_batch, eps)
        pixels = model.decode_latents(x0).float() if model.is_latent else x0
        residual = ((known - pixels) * interior).pow(2).sum()
        (grad,) = torch.autograd.grad(residual, x_in)
    a = model.alphas_cumprod.to(x.device)[t_batch].view(-1, 1, 1, 1).float()
    step = weight / (2 * a.sqrt()) * grad
    if not model.is_latent:
        step = torch.where(interior, torch.zeros_like(step), step)
    x0 = x0.detach().float() - step
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


@torch.no_grad()
def autoencoder_floor(model: DiffusionModel, canvases: torch.Tensor, keys: torch.Tensor, thickness: int, batch_size: int = 16,
                      latents: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image ℓ of the autoencoder's own round trip of the true canvas (0 for pixel models).

    A latent model cannot reproduce a key more precisely than its autoencoder does, so a δ
    below this floor cannot show memorization; report it next to the counts. ``latents``:
    the canvases' scaled posterior means when they are already known (a latent cache), which
    skips the encoder.
    """
    if not model.is_latent:
        return torch.zeros(canvases.shape[0], dtype=torch.float64)
    device = model.device
    preds = []
    for start in range(0, canvases.shape[0], int(batch_size)):
        if latents is not None:
            z = latents[start : start + int(batch_size)].to(device)
        else:
            z = model.encode_images(canvases[start : start + int(batch_size)].to(device=device, dtype=torch.float32))
        round_trip = model.decode_latents(z).float().clamp(-1, 1).cpu()
        preds.append(border_key(round_trip, thickness))
    return eidetic_scores(torch.cat(preds), keys)


# ---------------------------------------------------------------------------------------
# scores and chance
# ---------------------------------------------------------------------------------------
def check_deltas(deltas) -> tuple[float, ...]:
    deltas = tuple(float(d) for d in (deltas if isinstance(deltas, (list, tuple)) else [deltas]))
    if not deltas:
        raise ValueError("need at least one δ threshold, e.g. deltas=[0.1, 0.05, 0.005]")
    for d in deltas:
        if not 0.0 < d < 1.0:
            raise ValueError(f"δ thresholds must lie in (0, 1) (key scale), got {d}; e.g. deltas=[0.1, 0.05, 0.005]")
    return deltas


def _as_key_scale(values, name: str) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    if values.numel() and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} must be in key scale [0, 1], got values in [{values.min().item():.3f}, {values.max().item():.3f}]; "
            "a value below 0 looks like a border pixel in [-1, 1]: convert with eidetic.borders.pixel_to_key"
        )
    return values


def eidetic_scores(pred_keys, keys) -> torch.Tensor:
    """ℓ = |predicted key − key| per image, both in key scale [0, 1] (float64)."""
    pred = _as_key_scale(pred_keys, "predicted keys")
    true = _as_key_scale(keys, "keys")
    if pred.shape != true.shape:
        raise ValueError(f"got {pred.numel()} predictions for {true.numel()} keys")
    return (pred - true).abs()


def eidetic_counts(scores, deltas=DEFAULT_DELTAS) -> dict[float, int]:
    """Number of images with ℓ < δ, for each δ."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    return {d: int((scores < d).sum()) for d in check_deltas(deltas)}


def chance_probability(pred_keys, delta: float) -> torch.Tensor:
    """P(|p − k| < δ) for k ~ U[0, 1) independent of the prediction p: |(p−δ, p+δ) ∩ [0, 1)|."""
    (delta,) = check_deltas([delta])
    pred = _as_key_scale(pred_keys, "predicted keys")
    return ((pred + delta).clamp(max=1.0) - (pred - delta).clamp(min=0.0)).clamp(min=0.0)


def per_image_p_values(pred_keys, keys) -> torch.Tensor:
    """Per-image p-value of "this prediction ignores the key": P(ℓ' <= ℓ) for an independent
    key k' ~ U[0, 1), i.e. the chance probability at the image's own ℓ. Exactly uniform under
    the null, whatever the prediction, so it can be thresholded with false-discovery control
    across images (:func:`eidetic.stats.benjamini_hochberg`)."""
    pred = _as_key_scale(pred_keys, "predicted keys")
    loss = eidetic_scores(pred, keys)
    return ((pred + loss).clamp(max=1.0) - (pred - loss).clamp(min=0.0)).clamp(min=0.0)


def chance_count(pred_keys, delta: float) -> float:
    """Expected number of (ℓ < δ) hits if every prediction were independent of its key."""
    return float(chance_probability(pred_keys, delta).sum())


def binomial_p_value(pred_keys, keys, delta: float) -> float:
    """One-sided p-value of the (ℓ < δ) count against "the prediction ignores the key"."""
    scores = eidetic_scores(pred_keys, keys)
    observed = int((scores < check_deltas([delta])[0]).sum())
    return poisson_binomial_sf(observed, chance_probability(pred_keys, delta))


def fixed_sample(total: int, size: int | None, seed: int = 0) -> list[int]:
    """A reproducible sorted sample of ``size`` indices out of ``total`` (all if size is None)."""
    if size is None or size == total:
        return list(range(total))
    if int(size) != size or size < 1:
        raise ValueError(f"sample size must be a positive integer, got {size!r}")
    if size > total:
        raise ValueError(f"cannot sample {size} images from a set of {total}; lower the sample size to at most {total}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(int(i) for i in perm[: int(size)])


def stratified_sample(strata: Sequence, size: int | None, seed: int = 0) -> list[int]:
    """A reproducible sorted sample of ``size`` positions out of ``len(strata)``, ``strata``
    giving each item's stratum (e.g. its copy count), each stratum in proportion to its size
    and at least one from each (the rarest first when ``size`` is smaller than their number):
    a few duplicated images among a million singles are still scored.

    With one stratum (or ``size`` null or the whole set) it is :func:`fixed_sample`.
    """
    total = len(strata)
    groups: dict = {}
    for i, label in enumerate(strata):
        groups.setdefault(label, []).append(i)
    if size is None or size == total or len(groups) <= 1:
        return fixed_sample(total, size, seed)
    fixed_sample(total, size, seed)  # the same checks of size
    size = int(size)
    labels = sorted(groups)
    alloc = {label: 0 for label in labels}
    for label in sorted(labels, key=lambda label: (len(groups[label]), label))[:size]:
        alloc[label] = 1
    spare = {label: len(groups[label]) - alloc[label] for label in labels}
    remaining, total_spare = size - sum(alloc.values()), sum(spare.values())
    quota = {label: remaining * spare[label] / total_spare if total_spare else 0.0 for label in labels}
    for label in labels:
        alloc[label] += min(spare[label], int(quota[label]))
    # the seats left go by largest remainder, to strata that still have images
    while sum(alloc.values()) < size:
        label = max((lb for lb in labels if alloc[lb] < len(groups[lb])), key=lambda lb: (quota[lb] - int(quota[lb]), -labels.index(lb)))
        alloc[label] += 1
        quota[label] = float(int(quota[label]))
    out: list[int] = []
    for k, label in enumerate(labels):
        if alloc[label]:
            out += [groups[label][j] for j in fixed_sample(len(groups[label]), alloc[label], seed=int(seed) * 1009 + k)]
    return sorted(out)


# ---------------------------------------------------------------------------------------
# aggregation across processes
# ---------------------------------------------------------------------------------------
class SolidMarkMetric(Metric):
    """Per-image SolidMark scores gathered across processes (states are ``cat``-reduced).

    ``update(pred_keys, keys, trained, copies, index)``: predictions and keys in key
    scale, whether each image was trained on (False: held-out), its number of copies in
    the training set, and a stable integer index (for per-image tables). ``compute()``
    returns eidetic counts, chance counts and p-values per δ for both splits, the AUCs
    (score −ℓ) of trained vs held-out and of duplicated vs single trained images, and the
    gathered per-image tensors sorted by index, with each image's p-value
    (:func:`per_image_p_values`) and whether Benjamini-Hochberg at ``flag_q`` flags it
    (within its split).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, deltas=DEFAULT_DELTAS, flag_q: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.deltas = check_deltas(deltas)
        self.flag_q = float(flag_q)
        for name in ("pred_keys", "keys", "trained", "copies", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, pred_keys, keys, trained, copies, index) -> None:
        pred = _as_key_scale(pred_keys, "predicted keys")
        true = _as_key_scale(keys, "keys")
        n = pred.numel()
        trained = torch.as_tensor(trained).reshape(-1).to(torch.float64)
        copies = torch.as_tensor(copies).reshape(-1).to(torch.float64)
        index = torch.as_tensor(index).reshape(-1).to(torch.float64)
        if not (true.numel() == trained.numel() == copies.numel() == index.numel() == n):
            raise ValueError("pred_keys, keys, trained, copies and index need one entry per image")
        device = self.device
        self.pred_keys.append(pred.to(device))
        self.keys.append(true.to(device))
        self.trained.append(trained.to(device))
        self.copies.append(copies.to(device))
        self.index.append(index.to(device))

    def _gathered(self) -> dict[str, torch.Tensor]:
        def cat(state):
            if isinstance(state, list):
                return torch.cat(state).cpu() if state else torch.zeros(0, dtype=torch.float64)
            return state.reshape(-1).cpu()

        rows = {name: cat(getattr(self, name)) for name in ("pred_keys", "keys", "trained", "copies", "index")}
        order = torch.argsort(rows["index"])
        return {name: value[order] for name, value in rows.items()}

    def compute(self) -> dict:
        rows = self._gathered()
        loss = (rows["pred_keys"] - rows["keys"]).abs()
        trained = rows["trained"] > 0.5
        result: dict = {"n_trained": int(trained.sum()), "n_heldout": int((~trained).sum())}
        for split, mask in (("trained", trained), ("heldout", ~trained)):
            pred, lo = rows["pred_keys"][mask], loss[mask]
            result[split] = {
                "eidetic": {d: int((lo < d).sum()) for d in self.deltas},
                "chance": {d: chance_count(pred, d) for d in self.deltas},
                "p_value": {d: poisson_binomial_sf(int((lo < d).sum()), chance_probability(pred, d)) for d in self.deltas},
                "mean_loss": float(lo.mean()) if lo.numel() else None,
                "median_loss": float(lo.median()) if lo.numel() else None,
            }
        result["auc_heldout"] = rank_auc(-loss, trained)
        dup = rows["copies"][trained] > 1.5
        result["auc_duplicated"] = rank_auc(-loss[trained], dup)
        p_values = per_image_p_values(rows["pred_keys"], rows["keys"])
        flagged = torch.zeros_like(trained)
        for mask in (trained, ~trained):
            if mask.any():
                flagged[mask] = torch.from_numpy(benjamini_hochberg(p_values[mask].numpy(), self.flag_q))
        result["trained"]["flagged"] = int(flagged[trained].sum())
        result["heldout"]["flagged"] = int(flagged[~trained].sum())
        result["flag_q"] = self.flag_q
        result["per_image"] = {**rows, "loss": loss, "p_value": p_values, "flagged": flagged}
        return result
