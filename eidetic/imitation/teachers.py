"""Teachers: the black-box image-to-image models whose single example a student imitates."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .crops import output_scale
from .images import ImitationError, to_numpy, to_tensor


@dataclass
class Teacher:
    """An image-to-image function plus what the audit needs to know about it.

    ``blind`` is True when the operator's parameters are drawn per image (so one example
    cannot determine it), False for a fixed operator, None when unknown (user callables).
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    blind: bool | None
    description: str
    params: dict = field(default_factory=dict)
    draws: list = field(
        default_factory=list
    )  # blind built-ins: parameters drawn, one entry per call

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


def _blind_blur(sigma_min: float, sigma_max: float, seed: int, draws: list):
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)

    def fn(x):
        sigma = float(rng.uniform(sigma_min, sigma_max))  # a fresh blur for every image
        draws.append({"sigma": sigma})
        return gaussian(
            x, sigma=sigma, channel_axis=2, mode="reflect", preserve_range=True
        )

    return fn


def _blind_noise(sigma_min: float, sigma_max: float, seed: int, draws: list):
    rng = np.random.default_rng(seed)

    def fn(x):
        sigma = float(
            rng.uniform(sigma_min, sigma_max)
        )  # a fresh noise level for every image
        draws.append({"sigma": sigma})
        return x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)

    return fn


# name -> (builder(params, seed, draws), blind, description, default params); blind builders
# append the parameters they draw to ``draws`` so reports can show what each image got.
BUILTIN_TEACHERS: dict[str, tuple[Callable, bool, str, dict]] = {
    "gaussian_blur": (
        lambda p, s, d: _gaussian_blur(p["sigma"]),
        False,
        "skimage.filters.gaussian, fixed sigma",
        {"sigma": 2.0},
    ),
    "unsharp_mask": (
        lambda p, s, d: _unsharp_mask(p["radius"], p["amount"]),
        False,
        "skimage.filters.unsharp_mask, fixed radius/amount, clipped to [0,1]",
        {"radius": 2.0, "amount": 1.0},
    ),
    "tv_denoise": (
        lambda p, s, d: _tv_denoise(p["weight"]),
        False,
        "skimage.restoration.denoise_tv_chambolle, fixed weight",
        {"weight": 0.2},
    ),
    "bicubic_sr": (
        lambda p, s, d: _bicubic_sr(p["scale"]),
        False,
        "skimage.transform.rescale order=3 (cubic), fixed integer scale",
        {"scale": 2},
    ),
    "blind_blur": (
        lambda p, s, d: _blind_blur(p["sigma_min"], p["sigma_max"], s, d),
        True,
        "Gaussian blur, sigma ~ U[sigma_min, sigma_max] drawn per image",
        {"sigma_min": 0.5, "sigma_max": 3.0},
    ),
    "blind_noise": (
        lambda p, s, d: _blind_noise(p["sigma_min"], p["sigma_max"], s, d),
        True,
        "additive Gaussian noise, level ~ U[sigma_min, sigma_max] drawn per image, clipped",
        {"sigma_min": 0.0, "sigma_max": 0.1},
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
            "diffusion, classical, blind, all) or give a callable as 'module:function'"
        )
    builder, blind, description, defaults = BUILTIN_TEACHERS[name]
    merged = {**defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(merged) - set(defaults)
    if unknown:
        raise ImitationError(
            f"teacher {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(defaults)}"
        )
    draws: list = []
    return Teacher(
        name=name,
        fn=builder(merged, seed, draws),
        blind=blind,
        description=description,
        params=merged,
        draws=draws,
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
    zero, so the map is fixed (non-blind); with ``noise=True`` a fresh eps is drawn per image
    (a blind teacher: the realisation in the example tells nothing about the next one).
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
        blind=bool(noise),
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
