"""Teachers: the black-box image-to-image models whose single example a student imitates."""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .crops import output_scale
from .images import ImitationError, to_numpy, to_tensor


INPUT_KINDS = ("noise", "blur")


@dataclass(frozen=True)
class InputDegradation:
    """How a restoration teacher's inputs are made from clean photographs.

    ``noise``: additive Gaussian noise of std ``level`` (on [0, 1]), clipped to [0, 1];
    ``blur``: a Gaussian point-spread function of std ``level`` pixels (``gaussian_psf``).
    The example input is degraded at ``level``; held-out inputs at each of
    ``heldout_levels`` -- the example's level for a non-blind teacher (its degradation is
    fixed and known), other levels for a blind one (it must adapt). Noise is seeded by
    the image's key and the level, so the same image always gets the same noisy input.
    """

    kind: str
    level: float
    heldout_levels: tuple[float, ...]

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ImitationError(f"unknown input degradation {self.kind!r}; use one of {INPUT_KINDS}")
        if self.level < 0 or any(v < 0 for v in self.heldout_levels) or not self.heldout_levels:
            raise ImitationError(
                f"degradation levels must be >= 0 with at least one held-out level, got {self.level}, {self.heldout_levels}"
            )

    def apply(self, image: np.ndarray, level: float, key: str) -> np.ndarray:
        if self.kind == "blur":
            return _convolve(image, gaussian_psf(level))
        seed = [zlib.crc32(key.encode()), int(round(level * 1e6))]
        noise = np.random.default_rng(seed).normal(0.0, level, size=image.shape)
        return np.clip(image + noise, 0.0, 1.0).astype(np.float32)

    def label(self, level: float) -> str:
        return f"{self.kind} {'σ' if self.kind == 'noise' else 'psf σ'}={level:g}"


@dataclass
class Teacher:
    """An image-to-image function plus what the audit needs to know about it.

    ``blind``: False for a fixed operator (one example can pin it down), True for a
    deterministic restoration model that adapts to an unknown degradation of its input
    (Spingarn & Michaeli's "blind"), None when unknown (user callables).
    ``stochastic``: True only for the negative control, whose output is random (a fresh
    draw per call), so no student can learn it; its name says so.
    ``inputs``: for restoration teachers, how their inputs are degraded from clean
    photographs (None: the teacher is applied to clean photographs).
    ``calls``: what the teacher recorded per call (the control's drawn noise level, the
    blind denoiser's estimated noise level), one entry per call.
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    blind: bool | None
    description: str
    params: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)
    inputs: InputDegradation | None = None
    stochastic: bool = False

    @property
    def kind(self) -> str:
        if self.stochastic:
            return "random (negative control)"
        return {True: "blind", False: "fixed", None: "unknown"}[self.blind]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = self.fn(image)
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        out = np.asarray(out)
        if out.ndim == 2:  # grayscale operator output
            out = np.repeat(out[..., None], 3, axis=-1)
        if out.ndim != 3 or out.shape[-1] != 3:
            raise ImitationError(
                f"teacher {self.name!r} returned an array of shape {out.shape}; it must return (H, W, 3) "
                "like its input (numpy, float in [0, 1])"
            )
        output_scale(image.shape[:2], out.shape[:2], what=f"teacher {self.name!r}")
        return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def gaussian_psf(sigma: float) -> np.ndarray:
    """A normalised 2-D Gaussian point-spread function of std ``sigma`` px, radius ceil(3 sigma)."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    psf = np.outer(k, k)
    return psf / psf.sum()


def _convolve(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    from scipy.ndimage import convolve

    return np.stack([convolve(image[..., c].astype(np.float64), psf, mode="reflect") for c in range(image.shape[-1])],
                    axis=-1).astype(np.float32)


def _gaussian_blur(sigma: float):
    from skimage.filters import gaussian

    return lambda x: gaussian(
        x, sigma=sigma, channel_axis=2, mode="reflect", preserve_range=True
    )


def _unsharp_mask(radius: float, amount: float):
    from skimage.filters import unsharp_mask

    # channel_axis must be 2, not -1: scikit-image 0.26 mis-handles the negative axis here.
    return lambda x: unsharp_mask(
        x, radius=radius, amount=amount, channel_axis=2, preserve_range=True
    )


def _tv_denoise(weight: float):
    from skimage.restoration import denoise_tv_chambolle

    return lambda x: denoise_tv_chambolle(x, weight=weight, channel_axis=2)


def _bicubic_sr(scale: int):
    from skimage.transform import rescale

    if int(scale) != scale or scale < 2:
        raise ImitationError(f"bicubic_sr needs an integer scale >= 2, got {scale}")
    # order=3: cubic spline interpolation; no anti-aliasing (upsampling never aliases)
    return lambda x: rescale(
        x, int(scale), order=3, channel_axis=2, mode="reflect", anti_aliasing=False
    )


def _wavelet_denoise(sigma: float | None, calls: list | None = None):
    """skimage's BayesShrink wavelet denoiser; ``sigma=None`` estimates the noise level of
    each input (``estimate_sigma``, the robust median estimator on the finest wavelet
    subband) -- the adaptive, blind form. Deterministic either way."""
    from skimage.restoration import denoise_wavelet, estimate_sigma

    def fn(x):
        if sigma is None:
            estimated = float(estimate_sigma(x, channel_axis=2, average_sigmas=True))
            if calls is not None:
                calls.append({"estimated_sigma": estimated})
            level = estimated
        else:
            level = sigma
        return denoise_wavelet(x, sigma=level, channel_axis=2, method="BayesShrink", mode="soft", rescale_sigma=True)

    return fn


def _richardson_lucy(blur_sigma: float, num_iter: int):
    """Richardson-Lucy deconvolution with the known Gaussian PSF, per channel."""
    from skimage.restoration import richardson_lucy

    psf = gaussian_psf(blur_sigma)
    return lambda x: np.stack(
        [richardson_lucy(x[..., c].astype(np.float64), psf, num_iter=int(num_iter), clip=True) for c in range(x.shape[-1])],
        axis=-1,
    )


def _random_noise_control(sigma_min: float, sigma_max: float, seed: int, calls: list):
    rng = np.random.default_rng(seed)

    def fn(x):
        sigma = float(rng.uniform(sigma_min, sigma_max))  # fresh level and noise every call
        calls.append({"sigma": sigma})
        return x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)

    return fn


def _noise_inputs(p: dict, blind: bool) -> InputDegradation:
    return InputDegradation("noise", float(p["sigma"]), tuple(float(v) for v in p["heldout_sigmas"]) if blind else (float(p["sigma"]),))


# name -> (builder(params, seed, calls), blind, description, default params,
#          inputs(params) -> InputDegradation | None, stochastic)
BUILTIN_TEACHERS: dict[str, tuple] = {
    "gaussian_blur": (
        lambda p, s, c: _gaussian_blur(p["sigma"]), False,
        "degradation: skimage.filters.gaussian with fixed sigma, applied to a clean photograph",
        {"sigma": 2.0}, None, False,
    ),
    "unsharp_mask": (
        lambda p, s, c: _unsharp_mask(p["radius"], p["amount"]), False,
        "operator: skimage.filters.unsharp_mask, fixed radius/amount, clipped to [0,1], on a clean photograph",
        {"radius": 2.0, "amount": 1.0}, None, False,
    ),
    "tv_denoise": (
        lambda p, s, c: _tv_denoise(p["weight"]), False,
        "operator: skimage.restoration.denoise_tv_chambolle with fixed weight, on a clean photograph",
        {"weight": 0.2}, None, False,
    ),
    "bicubic_sr": (
        lambda p, s, c: _bicubic_sr(p["scale"]), False,
        "operator: skimage.transform.rescale order=3 (cubic), fixed integer scale, on a clean photograph",
        {"scale": 2}, None, False,
    ),
    "wavelet_denoise": (
        lambda p, s, c: _wavelet_denoise(p["sigma"]), False,
        "restoration: skimage.restoration.denoise_wavelet (BayesShrink) at the known noise level sigma, "
        "on inputs with Gaussian noise of that sigma",
        {"sigma": 0.05}, lambda p: _noise_inputs(p, blind=False), False,
    ),
    "richardson_lucy": (
        lambda p, s, c: _richardson_lucy(p["blur_sigma"], p["num_iter"]), False,
        "restoration: skimage.restoration.richardson_lucy with the known Gaussian PSF, "
        "on inputs blurred by that PSF",
        {"blur_sigma": 1.5, "num_iter": 10},
        lambda p: InputDegradation("blur", float(p["blur_sigma"]), (float(p["blur_sigma"]),)), False,
    ),
    "wavelet_denoise_blind": (
        lambda p, s, c: _wavelet_denoise(None, c), True,
        "blind restoration: denoise_wavelet (BayesShrink) at the noise level it estimates from each input "
        "(estimate_sigma); example noisy at sigma, held-out inputs at heldout_sigmas",
        {"sigma": 0.05, "heldout_sigmas": [0.02, 0.1]}, lambda p: _noise_inputs(p, blind=True), False,
    ),
    "random_noise_control": (
        lambda p, s, c: _random_noise_control(p["sigma_min"], p["sigma_max"], s, c), None,
        "NEGATIVE CONTROL (random, not a model): fresh Gaussian noise, level ~ U[sigma_min, sigma_max], "
        "drawn on every call, clipped",
        {"sigma_min": 0.0, "sigma_max": 0.1}, None, True,
    ),
}


def load_callable_teacher(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """Import ``"package.module:function"``; the function maps (H, W, 3) [0,1] numpy → same layout."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ImitationError(
            f"teacher {path!r}: a callable teacher is written 'module:function' (e.g. mypkg.ops:sharpen)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImitationError(
            f"teacher {path!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ImitationError(
                f"teacher {path!r}: module {module_name!r} has no attribute {attr!r}"
            )
    if not callable(fn):
        raise ImitationError(f"teacher {path!r}: {attr!r} is not callable")
    return fn


def build_teacher(name: str, params: dict | None = None, seed: int = 0) -> Teacher:
    """A built-in teacher by name (parameters override its defaults) or ``"module:function"``."""
    if ":" in name:
        fn = load_callable_teacher(name)
        return Teacher(
            name=name, fn=fn, blind=None, description=f"user callable {name}"
        )
    if name not in BUILTIN_TEACHERS:
        raise ImitationError(
            f"unknown teacher {name!r}: choose one of {', '.join(BUILTIN_TEACHERS)} (imitate.py also takes "
            "diffusion, classical, restoration, blind, control, all) or give a callable as 'module:function'"
        )
    builder, blind, description, defaults, inputs, stochastic = BUILTIN_TEACHERS[name]
    merged = {**defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(merged) - set(defaults)
    if unknown:
        raise ImitationError(
            f"teacher {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(defaults)}"
        )
    calls: list = []
    return Teacher(
        name=name,
        fn=builder(merged, seed, calls),
        blind=blind,
        description=description,
        params=merged,
        calls=calls,
        inputs=inputs(merged) if inputs else None,
        stochastic=stochastic,
    )


def diffusion_teacher(
    model,
    timestep: int = 100,
    caption: str = "",
    guidance: float = 1.0,
    noise: bool = False,
    seed: int = 0,
) -> Teacher:
    """A diffusion model (:class:`eidetic.diffusion.DiffusionModel`) used as an image-to-image function.

    One-step denoising at a fixed ``timestep``: encode, form x_t = sqrt(a_t) z0 + sqrt(1-a_t) eps,
    predict x0 with the (optionally guided) noise prediction, decode. With ``noise=False`` eps is
    zero, so the map is fixed (non-blind); with ``noise=True`` a fresh eps is drawn per call,
    so the output is random: a stochastic teacher (like the negative control), not a blind one.
    Images are reflect-padded to a multiple of the model's total downsampling and cropped back.
    Cost grows with the image area (the UNet's self-attention is global): keep images small.
    """
    blocks = getattr(getattr(model.unet, "config", None), "block_out_channels", None)
    multiple = model.downsample * (2 ** (len(blocks) - 1) if blocks else 8)
    if not 0 <= int(timestep) < model.num_train_timesteps:
        raise ImitationError(
            f"diffusion teacher timestep must be in [0, {model.num_train_timesteps}), got {timestep}"
        )
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def fn(x: np.ndarray) -> np.ndarray:
        img = to_tensor(x)[None] * 2 - 1
        h, w = img.shape[-2:]
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), mode="reflect")
        z0 = model.encode_images(img.to(model.device))
        t = torch.full((1,), int(timestep), dtype=torch.long, device=z0.device)
        eps_in = (
            torch.randn(z0.shape, generator=generator).to(z0)
            if noise
            else torch.zeros_like(z0)
        )
        z_t = model.add_noise(z0, eps_in, t)
        cond = model.encode_prompt([caption])
        uncond = model.encode_prompt([""]) if guidance != 1.0 else None
        eps = model.predict_noise(z_t, t, cond, uncond, guidance)
        x0 = model.decode_latents(model.predict_x0(z_t, t, eps)).float().clamp(-1, 1)
        return to_numpy(((x0 + 1) / 2)[0, :, :h, :w])

    return Teacher(
        name="diffusion",
        fn=fn,
        blind=False,
        stochastic=bool(noise),
        description=f"diffusion model, one-step denoising at t={timestep}"
        + (" with fresh noise" if noise else " without noise"),
        params={
            "timestep": int(timestep),
            "caption": caption,
            "guidance": guidance,
            "noise": bool(noise),
        },
    )


def is_deterministic(teacher: Teacher, image: np.ndarray) -> bool:
    """Does the teacher give the same output twice for the same image? (probes user callables)."""
    return bool(np.array_equal(teacher(image), teacher(image)))
