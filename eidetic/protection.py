"""Protective perturbations against diffusion mimicry (Xue et al., ICLR 2024).

A data owner adds a small perturbation delta (||delta||_inf <= eps) to an image so that a
latent diffusion model edits or learns it badly. The perturbation is found by
signed-gradient PGD against one of these objectives (every objective is written as a
quantity to *ascend*; the sign in its name says what happens to the semantic loss):

=============  ==============================================================================
``advdm+``     + L_S, full backprop through UNet and encoder (AdvDM)
``advdm-``     - L_S, full backprop
``photoguard`` - L_T (pull the encoder latent towards a target image's latent)
``mist``       + L_S - w * L_T (Mist: semantic and textural together, full backprop)
``sds+``       + L_S with the score-distillation gradient (no UNet Jacobian)
``sds-``       - L_S with the score-distillation gradient
``sdst``       - L_S (SDS) - w * L_T  (SDS(-) plus the textural term)
=============  ==============================================================================

L_S (semantic) is the diffusion loss ||eps_theta(z_t, t, c) - eps||^2 of z = E(x + delta) at
a random t; L_T (textural) is ||E(x + delta) - E(x_target)||^2. Both are per-image means over
latent elements, summed over the batch so an image's gradient does not depend on its
batch mates.

The SDS gradient replaces the UNet Jacobian d eps_theta / d z_t by the identity, leaving
(2/n)(eps_theta - eps) pushed back through the encoder only; the UNet runs under
``torch.no_grad`` so none of its activations are kept. That is where the claimed 2x time
and memory saving comes from (see ``benchmarks/protection_cost.py``).

PGD works in 8-bit levels: the image the gradient is taken at is always the quantised
one (clean + round(delta), clipped to valid pixels), so what is saved as PNG is exactly
what was optimised, and ||delta||_inf <= eps_in_levels(eps) / 255 holds after saving.

Evaluation helpers: visibility (PSNR/SSIM of protected vs clean) and SDEdit of clean and
protected images through the model, compared with the clean image.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from eidetic.diffusion import DiffusionModel
from eidetic.schema.protect import OBJECTIVES, RANDOM, SEMANTIC_OBJECTIVES, TEXTURAL_OBJECTIVES

__all__ = [
    "OBJECTIVES",
    "RANDOM",
    "SEMANTIC_OBJECTIVES",
    "TEXTURAL_OBJECTIVES",
    "semantic_loss",
    "textural_loss",
    "sds_surrogate",
    "objective_value",
    "attack_gradient",
    "semantic_gradient",
    "encode_for_attack",
    "random_start_default",
    "protect_images",
    "quantise_perturbation",
    "to_levels",
    "from_levels",
    "default_target_pattern",
    "sdedit",
    "image_similarity",
    "latent_distance",
    "evaluate_semantic_loss",
]


# ---- losses -------------------------------------------------------------------------
def _per_image_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def semantic_loss(model: DiffusionModel, images: torch.Tensor, cond: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B,) diffusion loss of E(images) at ``timesteps`` with ``noise``; differentiable end to end."""
    return _semantic_loss_of_latents(model, model.encode_images(images), cond, timesteps, noise)


def _semantic_loss_of_latents(model, z, cond, timesteps, noise):
    z_t = model.add_noise(z, noise.to(z.dtype), timesteps)
    eps = model.predict_noise(z_t, timesteps, cond)
    return _per_image_mean((eps.float() - noise.float()) ** 2)


def sds_surrogate(model: DiffusionModel, images: torch.Tensor, cond: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate, L_S): the surrogate's gradient w.r.t. ``images`` is the SDS gradient of L_S.

    d L_S / d z = (2/n) sqrt(abar) J_UNet^T (eps_theta - eps); SDS drops the UNet Jacobian
    and the sqrt(abar) factor (the DreamFusion weighting w(t) = 1), leaving
    (2/n)(eps_theta - eps), which is then pushed back through the encoder by autograd.
    """
    return _sds_surrogate_of_latents(model, model.encode_images(images), cond, timesteps, noise)


def _sds_surrogate_of_latents(model, z, cond, timesteps, noise):
    with torch.no_grad():  # no UNet graph: the point of SDS
        z_t = model.add_noise(z.detach(), noise.to(z.dtype), timesteps)
        eps = model.predict_noise(z_t, timesteps, cond)
        residual = eps.float() - noise.float()
        loss = _per_image_mean(residual**2)
        n = residual[0].numel()
    surrogate = (2.0 / n) * (residual * z.float()).flatten(1).sum(dim=1)
    return surrogate, loss


def textural_loss(model: DiffusionModel, images: torch.Tensor, target_latents: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared distance between E(images) and the target latents (PhotoGuard)."""
    return _textural_loss_of_latents(model.encode_images(images), target_latents)


def _textural_loss_of_latents(z, target_latents):
    target = target_latents.to(z.dtype)
    if target.shape[0] == 1 and z.shape[0] > 1:
        target = target.expand_as(z)
    if target.shape != z.shape:
        raise ValueError(f"target latents {tuple(target.shape)} do not match the images' latents {tuple(z.shape)}; encode a target of the same size")
    return _per_image_mean((z.float() - target.float()) ** 2)


def _check_objective(objective: str, allow_random: bool = False) -> None:
    if objective not in OBJECTIVES and not (allow_random and objective == RANDOM):
        choices = (*OBJECTIVES, RANDOM) if allow_random else OBJECTIVES
        raise ValueError(f"unknown protection objective {objective!r}; choose one of {', '.join(choices)}")


def objective_value(
    model: DiffusionModel,
    images: torch.Tensor,
    cond: torch.Tensor,
    objective: str,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    target_latents: torch.Tensor | None = None,
    textural_weight: float = 1.0,
    sdst_target_rate: float | None = None,
    posterior_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B,) quantity PGD ascends for ``objective``, plus the detached loss terms it used.

    The encoder runs once; semantic and textural terms share its latents (the posterior
    mean, or the sample ``mean + std * posterior_noise``).

    ``sdst_target_rate`` (sdst only): weight the terms as Diff-Protect's official code does,
    so the signed step is sign(rate * J^T (eps_hat - eps) + J^T 2 (z - z_target)) with the
    textural term a sum of squares; ``None``: -L_S(SDS) - textural_weight * L_T with
    per-element means (the same direction as rate = 2 / textural_weight).
    """
    _check_objective(objective)
    if objective in TEXTURAL_OBJECTIVES and target_latents is None:
        raise ValueError(f"objective {objective!r} needs target latents (encode a target image)")
    if sdst_target_rate is not None and not sdst_target_rate > 0:
        raise ValueError(f"sdst_target_rate must be > 0 or None, got {sdst_target_rate}")
    z = encode_for_attack(model, images, posterior_noise)
    n = z[0].numel()
    diff_protect_sdst = objective == "sdst" and sdst_target_rate is not None
    terms: dict[str, torch.Tensor] = {}
    value = torch.zeros(images.shape[0], device=images.device)
    if objective in ("advdm+", "advdm-", "mist"):
        ls = _semantic_loss_of_latents(model, z, cond, timesteps, noise).float()
        terms["semantic"] = ls.detach()
        value = value + (-ls if objective == "advdm-" else ls)
    elif objective in ("sds+", "sds-", "sdst"):
        surrogate, ls = _sds_surrogate_of_latents(model, z, cond, timesteps, noise)
        terms["semantic"] = ls.detach()
        if diff_protect_sdst:  # (n/2) * surrogate has the gradient J^T (eps_hat - eps), the official code's
            surrogate = float(sdst_target_rate) * (n / 2.0) * surrogate
        value = value + (surrogate if objective == "sds+" else -surrogate)
    if objective in TEXTURAL_OBJECTIVES:
        lt = _textural_loss_of_latents(z, target_latents).float()
        terms["textural"] = lt.detach()
        if diff_protect_sdst:  # sum-MSE: gradient J^T 2 (z - z_target)
            value = value - n * lt
        else:
            weight = 1.0 if objective == "photoguard" else float(textural_weight)
            value = value - weight * lt
    return value, terms


def encode_for_attack(model: DiffusionModel, images: torch.Tensor, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
    """The latents the attack differentiates: the posterior mean, or with ``posterior_noise`` the
    reparameterised posterior sample mean + std * noise (Diff-Protect encodes with a sample)."""
    if posterior_noise is None or model.vae is None:
        return model.encode_images(images)
    vae_dtype = next(model.vae.parameters()).dtype
    dist = model.vae.encode(images.to(vae_dtype)).latent_dist
    return (dist.mean + dist.std * posterior_noise.to(dist.mean.dtype)) * model.latent_scale


def attack_gradient(model, images, cond, objective, timesteps, noise, target_latents=None, textural_weight=1.0,
                    sdst_target_rate=None, posterior_noise=None):
    """(gradient of the objective w.r.t. ``images``, loss terms). Only the input gets a gradient."""
    x = images.detach().requires_grad_(True)
    with _frozen(model):
        value, terms = objective_value(model, x, cond, objective, timesteps, noise, target_latents, textural_weight,
                                       sdst_target_rate, posterior_noise)
        (grad,) = torch.autograd.grad(value.sum(), x)
    return grad, terms


def semantic_gradient(model: DiffusionModel, images, cond, timesteps, noise, method: str = "full") -> torch.Tensor:
    """Gradient of sum_b L_S w.r.t. the images: exact (``"full"``) or score-distilled (``"sds"``).

    Same model, images, timesteps and noise for both, so the two compare on equal terms.
    """
    if method not in ("full", "sds"):
        raise ValueError(f"method must be 'full' or 'sds', got {method!r}")
    grad, _ = attack_gradient(model, images, cond, "advdm+" if method == "full" else "sds+", timesteps, noise)
    return grad


@contextmanager
def _frozen(model: DiffusionModel):
    """Switch off parameter gradients while attacking, so no weight-gradient work is done."""
    modules = [m for m in (model.unet, model.vae) if hasattr(m, "parameters")]
    params = [p for m in modules for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)


# Diff-Protect runs AdvDM, PhotoGuard (texture_only) and Mist through advertorch's LinfPGDAttack,
# whose rand_init defaults to True, and its SDS objectives through its own pgd_sds, whose
# random_start defaults to False.
RANDOM_START_OBJECTIVES = ("advdm+", "advdm-", "photoguard", "mist")


def random_start_default(objective: str) -> bool:
    """Whether Diff-Protect's code starts PGD for ``objective`` from a random point of the eps-ball
    (the null perturbation runs no PGD)."""
    _check_objective(objective, allow_random=True)
    return objective in RANDOM_START_OBJECTIVES


# ---- 8-bit levels and projection ----------------------------------------------------
def to_levels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to 8-bit levels 0..255 (float, rounded)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def from_levels(levels: torch.Tensor) -> torch.Tensor:
    return levels / 127.5 - 1


# A budget this close to a whole number of levels means that number: 0.0627 is 15.99 levels,
# written for 16/255, and flooring it would protect at 15/255.
_LEVEL_TOLERANCE = 0.05


def budget_fraction(eps: float | str) -> float:
    """An L_inf budget as a fraction of the [0, 1] range: a number, or a fraction string "16/255"."""
    if isinstance(eps, str):
        text = eps.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps must be a fraction of the pixel range such as 0.0627 or '16/255', got {eps!r}") from None
    return float(eps)


def eps_in_levels(eps: float | str) -> int:
    """The whole number of 8-bit levels a budget allows: the nearest whole number when the
    budget is within 1/20 of a level of it (so 0.0627 and '16/255' are both 16 levels),
    otherwise the largest whole number within it."""
    fraction = budget_fraction(eps)
    if not 0 < fraction <= 1:
        hint = f"; for {fraction:g} levels write eps={fraction:g}/255" if 1 < fraction <= 255 else ""
        raise ValueError(f"eps must be in (0, 1] as a fraction of the pixel range (16/255 = {16 / 255:.4f}), got {eps}{hint}")
    x = fraction * 255
    levels = round(x) if abs(x - round(x)) <= _LEVEL_TOLERANCE else math.floor(x)
    if levels < 1:
        raise ValueError(f"eps={eps} is smaller than one 8-bit level (1/255 = {1 / 255:.4f}); no perturbation would survive saving")
    return levels


def quantise_perturbation(clean_levels: torch.Tensor, delta: torch.Tensor, eps_levels: int) -> torch.Tensor:
    """Protected image in levels: clean + round(delta), within the L_inf ball and [0, 255]."""
    d = delta.round().clamp(-eps_levels, eps_levels)
    return (clean_levels + d).clamp(0, 255)


def _pad_to_multiple(images: torch.Tensor, factor: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    ph, pw = (-h) % factor, (-w) % factor
    if ph == 0 and pw == 0:
        return images
    return F.pad(images, (0, pw, 0, ph), mode="replicate")


def default_target_pattern(height: int, width: int, period: int = 8) -> torch.Tensor:
    """(3, H, W) high-contrast texture in [-1, 1], the built-in textural target.

    A stand-in for Mist's target pattern (no downloads): diagonal stripes in three phases,
    which every encoder maps far from natural-image latents.
    """
    y = torch.arange(height).view(-1, 1).float()
    x = torch.arange(width).view(1, -1).float()
    chans = [torch.sin(2 * math.pi * (x + y + k * period / 3) / period) for k in range(3)]
    return torch.stack(chans).sign().clamp(-1, 1)


# ---- PGD ----------------------------------------------------------------------------
def protect_images(
    model: DiffusionModel,
    images: torch.Tensor,
    cond: torch.Tensor,
    objective: str = "sds-",
    eps: float = 16 / 255,
    step_size: float = 1 / 255,
    steps: int = 100,
    t_range: tuple[int, int] | None = None,
    target: torch.Tensor | None = None,
    textural_weight: float = 1.0,
    generator: torch.Generator | None = None,
    step_callback: Callable[[int, dict[str, float]], None] | None = None,
    sdst_target_rate: float | None = None,
    random_start: bool = False,
    encoder_latent: str = "mean",
) -> torch.Tensor:
    """Signed-gradient PGD; returns protected images in [-1, 1] lying exactly on 8-bit levels.

    Args:
        images: (B, 3, H, W) in [-1, 1] (rounded to 8-bit levels first). Any size: images
            are padded (replicate) to a multiple of the autoencoder factor and cropped back.
        cond: (B, L, D) caption embeddings (``model.encode_prompt``).
        eps, step_size: fractions of the [0, 1] pixel range (16/255 and 1/255 in the paper).
        t_range: inclusive (min, max) timesteps sampled uniformly per image and step
            (default: the model's whole range).
        target: (3, H, W) or (B, 3, H, W) target image in [-1, 1] for textural objectives
            (default: :func:`default_target_pattern`), resized to the images if needed.
        step_callback: called as ``step_callback(step, {"semantic": .., "textural": ..})``.
        sdst_target_rate: Diff-Protect's SDST weighting (see :func:`objective_value`); None:
            ``textural_weight`` with per-element means.
        random_start: start from a uniform draw in the eps-ball (whole levels, valid pixels),
            as Diff-Protect's AdvDM/PhotoGuard/Mist (advertorch ``LinfPGDAttack``) do.
        encoder_latent: ``"mean"`` (the posterior mean) or ``"sample"`` (a fresh posterior
            sample at every step, Diff-Protect's ``get_first_stage_encoding``).
    """
    _check_objective(objective, allow_random=True)
    if encoder_latent not in ("mean", "sample"):
        raise ValueError(f"encoder_latent must be 'mean' or 'sample', got {encoder_latent!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if cond.shape[0] != images.shape[0]:
        raise ValueError(f"need one caption embedding per image: {cond.shape[0]} embeddings for {images.shape[0]} images")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    eps_levels = eps_in_levels(eps)
    step_levels = step_size * 255
    n_t = model.num_train_timesteps
    lo, hi = t_range if t_range is not None else (0, n_t - 1)
    if not 0 <= lo <= hi < n_t:
        raise ValueError(f"t_range must satisfy 0 <= min <= max < {n_t} (the model's training timesteps), got [{lo}, {hi}]")

    device = model.device
    b, _, h, w = images.shape
    clean = _pad_to_multiple(to_levels(images).to(device), model.downsample)
    cond = cond.to(device)

    target_latents = None
    if objective in TEXTURAL_OBJECTIVES:
        tgt = default_target_pattern(h, w) if target is None else target.float()
        if tgt.ndim == 3:
            tgt = tgt.unsqueeze(0)
        if tgt.shape[-2:] != (h, w):
            tgt = F.interpolate(tgt, size=(h, w), mode="bilinear", align_corners=False)
        tgt = _pad_to_multiple(tgt.clamp(-1, 1).to(device), model.downsample)
        with torch.no_grad():
            target_latents = model.encode_images(tgt)

    if objective == RANDOM:
        signs = torch.randint(0, 2, clean.shape, generator=generator).mul(2).sub(1).to(device)
        delta = (clean + signs * eps_levels).clamp(0, 255) - clean
        return from_levels(quantise_perturbation(clean, delta, eps_levels)[..., :h, :w])
    delta = torch.zeros_like(clean)
    if random_start:
        start = (torch.rand(clean.shape, generator=generator) * 2 - 1) * eps_levels
        delta = (clean + start.to(device).round()).clamp(0, 255) - clean
    for step in range(steps):
        protected = quantise_perturbation(clean, delta, eps_levels)
        t = torch.randint(lo, hi + 1, (b,), generator=generator).to(device)
        z_shape = (b, model.latent_channels, clean.shape[-2] // model.downsample, clean.shape[-1] // model.downsample)
        noise = torch.randn(z_shape, generator=generator).to(device)
        posterior = torch.randn(z_shape, generator=generator).to(device) if encoder_latent == "sample" and model.vae is not None else None
        grad, terms = attack_gradient(model, from_levels(protected), cond, objective, t, noise, target_latents, textural_weight,
                                      sdst_target_rate, posterior)
        # continuous delta accumulates sub-level steps; the gradient is always taken at the
        # quantised image, so the optimised and the saved image are the same
        delta = delta + step_levels * grad.sign()
        delta = delta.clamp(-eps_levels, eps_levels)
        delta = (clean + delta).clamp(0, 255) - clean  # valid pixels
        if step_callback is not None:
            step_callback(step, {k: float(v.mean()) for k, v in terms.items()})
    protected = quantise_perturbation(clean, delta, eps_levels)[..., :h, :w]
    return from_levels(protected)


# ---- evaluation ---------------------------------------------------------------------
@torch.no_grad()
def evaluate_semantic_loss(model: DiffusionModel, images, cond, samples: int = 8, t_range=None, generator=None) -> torch.Tensor:
    """(B,) L_S averaged over ``samples`` (t, noise) draws; same draws for the same generator seed."""
    device = model.device
    images = _pad_to_multiple(images.to(device), model.downsample)
    z = model.encode_images(images)
    lo, hi = t_range if t_range is not None else (0, model.num_train_timesteps - 1)
    total = torch.zeros(images.shape[0], device=device)
    for _ in range(samples):
        t = torch.randint(lo, hi + 1, (images.shape[0],), generator=generator).to(device)
        noise = torch.randn(z.shape, generator=generator).to(device)
        eps = model.predict_noise(model.add_noise(z, noise, t), t, cond.to(device))
        total += _per_image_mean((eps.float() - noise) ** 2)
    return total / samples


@torch.no_grad()
def sdedit(
    model: DiffusionModel,
    images: torch.Tensor,
    captions: Sequence[str],
    strength: float,
    steps: int = 50,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise E(images) to ``strength`` of the way and denoise (DDIM).

    Runs the last ``round(strength * steps)`` of a ``steps``-step DDIM schedule, starting
    from the encoded images noised to that step's timestep. Returns (B, 3, H, W) in [-1, 1].
    The same ``generator`` seed gives the same noise, so clean and protected images can be
    edited with identical randomness.
    """
    from diffusers import DDIMScheduler

    if not 0 < strength <= 1:
        raise ValueError(f"SDEdit strength must be in (0, 1], got {strength}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"need one caption per image: {len(captions)} captions for {images.shape[0]} images")
    scheduler = DDIMScheduler.from_config(model.scheduler.config, prediction_type="epsilon", clip_sample=False)
    scheduler.set_timesteps(steps)
    run = max(1, round(strength * steps))
    timesteps = scheduler.timesteps[steps - run:]
    device = model.device
    b, _, h, w = images.shape
    z0 = model.encode_images(_pad_to_multiple(images.to(device), model.downsample))
    noise = torch.randn(z0.shape, generator=generator).to(device)
    z = model.add_noise(z0, noise, timesteps[0].expand(b).to(device))
    cond = model.encode_prompt(list(captions))
    uncond = model.encode_prompt([""]) if guidance != 1.0 else None
    for t in timesteps:
        eps = model.predict_noise(z, t.to(device), cond, uncond, guidance)
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return model.decode_latents(z).clamp(-1, 1)[..., :h, :w]


def image_similarity(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB, capped at 100) and SSIM of images in [-1, 1], on the [0, 1] scale."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a01 = ((a.float().cpu() + 1) / 2).clamp(0, 1)
    b01 = ((b.float().cpu() + 1) / 2).clamp(0, 1)
    psnr = peak_signal_noise_ratio(a01, b01, data_range=1.0, reduction="none", dim=(1, 2, 3))
    side = min(a.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    ssim = structural_similarity_index_measure(a01, b01, data_range=1.0, reduction="none", kernel_size=kernel)
    return {"psnr": psnr.clamp(max=100.0), "ssim": ssim}


@torch.no_grad()
def latent_distance(model: DiffusionModel, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared distance of the model's own encoder latents (a local feature space).

    Caveat: this is the encoder the textural objectives attack, so it is one view of
    similarity, reported beside PSNR/SSIM rather than instead of them.
    """
    device = model.device
    za = model.encode_images(_pad_to_multiple(a.to(device), model.downsample))
    zb = model.encode_images(_pad_to_multiple(b.to(device), model.downsample))
    return _per_image_mean((za.float() - zb.float()) ** 2).cpu()
