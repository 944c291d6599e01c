"""Single-example imitation of an image-to-image model (Spingarn & Michaeli, 2024).

Given exactly one (input, output) pair of a black-box image-to-image model (the *teacher*),
train a small *student* network with an L2 loss on random crops of that pair, then measure
how well the student reproduces the teacher on images it has never seen. A fixed
(non-blind) operator with a small receptive field turns one large image into many training
examples, so a student can copy it; a blind operator (its parameters drawn per image)
cannot be pinned down from one example.

Conventions (everything in this module):

* Teachers work on numpy arrays ``(H, W, 3)`` float in ``[0, 1]`` — the format of the
  scientific-Python operators they wrap — and return the same layout. A user teacher given
  as ``"module:function"`` must follow the same contract.
* Students and metrics work on torch tensors ``(B, 3, H, W)`` float in ``[0, 1]``
  (PSNR/SSIM with ``data_range=1``).
* Sizes: the teacher's output must have the input's size, or exactly ``s`` times it in both
  dimensions for an integer ``s >= 2`` (super-resolution). In the latter case the student
  runs at input resolution and ends in a pixel-shuffle head with ``3 * s**2`` channels
  (ESPCN-style), added to a nearest-neighbour upsampling of its input; a crop of side ``c``
  in the input is paired with the aligned crop of side ``s * c`` in the output. Anything
  else (different aspect, non-integer scale, fewer pixels) is an :class:`ImitationError`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic.errors import InputError
from eidetic.images import decode_image
from eidetic.photos import ALIASES, PHOTOS, load_photo

__all__ = [
    "ImitationError",
    "BUILTIN_TEACHERS",
    "Teacher",
    "build_teacher",
    "diffusion_teacher",
    "load_callable_teacher",
    "load_image",
    "center_crop",
    "to_tensor",
    "to_numpy",
    "output_scale",
    "check_pair",
    "RandomCropSampler",
    "PlainCNN",
    "SmallUNet",
    "build_student",
    "receptive_field",
    "apply_student",
    "image_metrics",
    "HeldoutPair",
    "heldout_pairs",
    "evaluate_student",
    "identity_prediction",
    "is_deterministic",
    "save_student",
    "load_student",
]


class ImitationError(InputError):
    """Input the imitation audit cannot use: says what was wrong and how to fix it."""


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------
def load_image(spec: str | Path) -> np.ndarray:
    """A built-in photograph by name (``astronaut``, see :mod:`eidetic.photos`) or an image file
    (decoded by :func:`eidetic.images.decode_image`) -> ``(H, W, 3)`` float32 in [0, 1]."""
    spec = str(spec)
    path = Path(spec)
    if path.suffix and path.is_file():
        try:
            arr = decode_image(path)
        except Exception as exc:
            raise ImitationError(f"cannot read image {spec}: {type(exc).__name__}: {exc}") from exc
    elif not path.suffix and (spec in PHOTOS or spec in ALIASES):
        arr = load_photo(spec)
    else:
        raise ImitationError(
            f"cannot load image {spec!r}: give an existing image file path or one of the built-in photographs {', '.join(PHOTOS)}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32) / 255.0


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central ``size x size`` square of ``(H, W, C)``; ``size <= 0`` returns the image unchanged."""
    if size <= 0:
        return image
    h, w = image.shape[:2]
    if size > min(h, w):
        raise ImitationError(f"cannot cut a {size}x{size} crop from a {h}x{w} image: choose a size <= {min(h, w)}")
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` numpy in [0, 1] → ``(3, H, W)`` float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).contiguous()


def to_numpy(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` tensor → ``(H, W, 3)`` float32 numpy."""
    return image.detach().cpu().float().permute(1, 2, 0).numpy()


def _fingerprint(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# teachers
# ---------------------------------------------------------------------------------------
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
    draws: list = field(default_factory=list)  # blind built-ins: parameters drawn, one entry per call

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

    return lambda x: gaussian(x, sigma=sigma, channel_axis=2, mode="reflect", preserve_range=True)


def _unsharp_mask(radius: float, amount: float):
    from skimage.filters import unsharp_mask

    # channel_axis must be 2, not -1: scikit-image 0.26 mis-handles the negative axis here.
    return lambda x: unsharp_mask(x, radius=radius, amount=amount, channel_axis=2, preserve_range=True)


def _tv_denoise(weight: float):
    from skimage.restoration import denoise_tv_chambolle

    return lambda x: denoise_tv_chambolle(x, weight=weight, channel_axis=2)


def _bicubic_sr(scale: int):
    from skimage.transform import rescale

    if int(scale) != scale or scale < 2:
        raise ImitationError(f"bicubic_sr needs an integer scale >= 2, got {scale}")
    # order=3: cubic spline interpolation; no anti-aliasing (upsampling never aliases)
    return lambda x: rescale(x, int(scale), order=3, channel_axis=2, mode="reflect", anti_aliasing=False)


def _blind_blur(sigma_min: float, sigma_max: float, seed: int, draws: list):
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)

    def fn(x):
        sigma = float(rng.uniform(sigma_min, sigma_max))  # a fresh blur for every image
        draws.append({"sigma": sigma})
        return gaussian(x, sigma=sigma, channel_axis=2, mode="reflect", preserve_range=True)

    return fn


def _blind_noise(sigma_min: float, sigma_max: float, seed: int, draws: list):
    rng = np.random.default_rng(seed)

    def fn(x):
        sigma = float(rng.uniform(sigma_min, sigma_max))  # a fresh noise level for every image
        draws.append({"sigma": sigma})
        return x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)

    return fn


# name -> (builder(params, seed, draws), blind, description, default params); blind builders
# append the parameters they draw to ``draws`` so reports can show what each image got.
BUILTIN_TEACHERS: dict[str, tuple[Callable, bool, str, dict]] = {
    "gaussian_blur": (lambda p, s, d: _gaussian_blur(p["sigma"]), False,
                      "skimage.filters.gaussian, fixed sigma", {"sigma": 2.0}),
    "unsharp_mask": (lambda p, s, d: _unsharp_mask(p["radius"], p["amount"]), False,
                     "skimage.filters.unsharp_mask, fixed radius/amount, clipped to [0,1]",
                     {"radius": 2.0, "amount": 1.0}),
    "tv_denoise": (lambda p, s, d: _tv_denoise(p["weight"]), False,
                   "skimage.restoration.denoise_tv_chambolle, fixed weight", {"weight": 0.2}),
    "bicubic_sr": (lambda p, s, d: _bicubic_sr(p["scale"]), False,
                   "skimage.transform.rescale order=3 (cubic), fixed integer scale", {"scale": 2}),
    "blind_blur": (lambda p, s, d: _blind_blur(p["sigma_min"], p["sigma_max"], s, d), True,
                   "Gaussian blur, sigma ~ U[sigma_min, sigma_max] drawn per image",
                   {"sigma_min": 0.5, "sigma_max": 3.0}),
    "blind_noise": (lambda p, s, d: _blind_noise(p["sigma_min"], p["sigma_max"], s, d), True,
                    "additive Gaussian noise, level ~ U[sigma_min, sigma_max] drawn per image, clipped",
                    {"sigma_min": 0.0, "sigma_max": 0.1}),
}


def load_callable_teacher(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """Import ``"package.module:function"``; the function maps (H, W, 3) [0,1] numpy → same layout."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ImitationError(f"teacher {path!r}: a callable teacher is written 'module:function' (e.g. mypkg.ops:sharpen)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImitationError(f"teacher {path!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ImitationError(f"teacher {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ImitationError(f"teacher {path!r}: {attr!r} is not callable")
    return fn


def build_teacher(name: str, params: dict | None = None, seed: int = 0) -> Teacher:
    """A built-in teacher by name (parameters override its defaults) or ``"module:function"``."""
    if ":" in name:
        fn = load_callable_teacher(name)
        return Teacher(name=name, fn=fn, blind=None, description=f"user callable {name}")
    if name not in BUILTIN_TEACHERS:
        raise ImitationError(
            f"unknown teacher {name!r}: choose one of {', '.join(BUILTIN_TEACHERS)} (imitate.py also takes "
            "diffusion, classical, blind, all) or give a callable as 'module:function'"
        )
    builder, blind, description, defaults = BUILTIN_TEACHERS[name]
    merged = {**defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(merged) - set(defaults)
    if unknown:
        raise ImitationError(f"teacher {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(defaults)}")
    draws: list = []
    return Teacher(name=name, fn=builder(merged, seed, draws), blind=blind, description=description, params=merged,
                   draws=draws)


def diffusion_teacher(model, timestep: int = 100, caption: str = "", guidance: float = 1.0,
                      noise: bool = False, seed: int = 0) -> Teacher:
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
        raise ImitationError(f"diffusion teacher timestep must be in [0, {model.num_train_timesteps}), got {timestep}")
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
        eps_in = torch.randn(z0.shape, generator=generator).to(z0) if noise else torch.zeros_like(z0)
        z_t = model.add_noise(z0, eps_in, t)
        cond = model.encode_prompt([caption])
        uncond = model.encode_prompt([""]) if guidance != 1.0 else None
        eps = model.predict_noise(z_t, t, cond, uncond, guidance)
        x0 = model.decode_latents(model.predict_x0(z_t, t, eps)).float().clamp(-1, 1)
        return to_numpy(((x0 + 1) / 2)[0, :, :h, :w])

    return Teacher(name="diffusion", fn=fn, blind=bool(noise),
                   description=f"diffusion model, one-step denoising at t={timestep}" + (" with fresh noise" if noise else " without noise"),
                   params={"timestep": int(timestep), "caption": caption, "guidance": guidance, "noise": bool(noise)})


def is_deterministic(teacher: Teacher, image: np.ndarray) -> bool:
    """Does the teacher give the same output twice for the same image? (probes user callables)."""
    return bool(np.array_equal(teacher(image), teacher(image)))


# ---------------------------------------------------------------------------------------
# sizes and pairs
# ---------------------------------------------------------------------------------------
def output_scale(input_hw: Sequence[int], output_hw: Sequence[int], what: str = "the pair") -> int:
    """1 for same-size pairs, ``s`` when the output is exactly ``s`` times the input; else an error."""
    (h, w), (oh, ow) = tuple(input_hw), tuple(output_hw)
    if (oh, ow) == (h, w):
        return 1
    if oh % h == 0 and ow % w == 0 and oh // h == ow // w and oh // h >= 2:
        return oh // h
    raise ImitationError(
        f"{what}: input is {h}x{w} but output is {oh}x{ow}. Input and output must have the same size, "
        "or the output must be exactly an integer multiple s>=2 of the input in both dimensions "
        "(super-resolution, imitated with a pixel-shuffle head). Resize or crop one of them so they match."
    )


def check_pair(x: torch.Tensor, y: torch.Tensor, crop_size: int) -> int:
    """Validate an example pair ``(3,H,W)``/``(3,sH,sW)``; returns the scale ``s``."""
    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != 3 or y.shape[0] != 3:
        raise ImitationError(f"example pair must be two (3, H, W) images, got {tuple(x.shape)} and {tuple(y.shape)}")
    scale = output_scale(x.shape[-2:], y.shape[-2:], what="example pair")
    h, w = x.shape[-2:]
    if crop_size > min(h, w):
        raise ImitationError(
            f"the example input is {h}x{w}, smaller than the training crop size {crop_size}: "
            f"use a larger example or set train.crop_size <= {min(h, w)}"
        )
    return scale


class RandomCropSampler:
    """Random aligned crops of one (input, output) pair, with a loss mask.

    A crop's outer ``margin`` pixels are computed by the student from padded (invented)
    context while the teacher saw the real image there, so they are masked out of the loss
    — except on sides where the crop touches the image edge, where the teacher also padded
    and the student must learn that behaviour.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, crop_size: int, batch_size: int,
                 margin: int = 0, generator: torch.Generator | None = None):
        self.scale = check_pair(x, y, crop_size)
        if margin < 0 or 2 * margin >= crop_size:
            raise ImitationError(f"loss margin {margin} leaves nothing of a {crop_size}px crop: need 0 <= margin < crop/2")
        self.x, self.y = x, y
        self.crop_size, self.batch_size, self.margin = int(crop_size), int(batch_size), int(margin)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def positions(self, n: int) -> torch.Tensor:
        h, w = self.x.shape[-2:]
        c = self.crop_size
        top = torch.randint(0, h - c + 1, (n,), generator=self.generator)
        left = torch.randint(0, w - c + 1, (n,), generator=self.generator)
        return torch.stack([top, left], dim=1)

    def crop(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, c, m = self.scale, self.crop_size, self.margin
        h, w = self.x.shape[-2:]
        xs, ys, masks = [], [], []
        for top, left in positions.tolist():
            xs.append(self.x[:, top : top + c, left : left + c])
            ys.append(self.y[:, s * top : s * (top + c), s * left : s * (left + c)])
            mask = torch.zeros(1, s * c, s * c)
            t0 = 0 if top == 0 else s * m
            l0 = 0 if left == 0 else s * m
            t1 = s * c if top + c == h else s * (c - m)
            l1 = s * c if left + c == w else s * (c - m)
            mask[:, t0:t1, l0:l1] = 1.0
            masks.append(mask)
        return torch.stack(xs), torch.stack(ys), torch.stack(masks)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x (B,3,c,c), y (B,3,sc,sc), mask (B,1,sc,sc))``."""
        return self.crop(self.positions(self.batch_size))


# ---------------------------------------------------------------------------------------
# students
# ---------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    # reflect padding: the classical teachers pad by reflection too, so image edges match
    return nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode="reflect" if k > 1 else "zeros")


class _Head(nn.Module):
    """Residual output: nearest-upsampled input + pixel-shuffled correction (scale 1: a plain residual)."""

    def __init__(self, width: int, kernel_size: int, scale: int):
        super().__init__()
        self.scale = scale
        self.proj = _conv(width, 3 * scale * scale, kernel_size)
        nn.init.zeros_(self.proj.weight)  # start as the identity/nearest-neighbour baseline
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        residual = self.proj(features)
        base = x
        if self.scale > 1:
            residual = F.pixel_shuffle(residual, self.scale)
            base = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return base + residual


class PlainCNN(nn.Module):
    """``depth`` convolutions of ``width`` channels with ReLU; receptive field 1 + depth*(k-1)."""

    def __init__(self, width: int = 32, depth: int = 6, kernel_size: int = 3, scale: int = 1):
        super().__init__()
        if depth < 2:
            raise ImitationError(f"student.depth must be >= 2 for the plain CNN, got {depth}")
        if kernel_size % 2 == 0:
            raise ImitationError(f"student.kernel_size must be odd, got {kernel_size}")
        layers: list[nn.Module] = [_conv(3, width, kernel_size), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [_conv(width, width, kernel_size), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = _Head(width, kernel_size, scale)
        self.config = {"arch": "cnn", "width": width, "depth": depth, "kernel_size": kernel_size, "scale": scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x - 0.5), x)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, n: int):
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [_conv(cin if i == 0 else cout, cout, k), nn.ReLU()]
        super().__init__(*layers)


class SmallUNet(nn.Module):
    """A small UNet: ``depth`` downsamplings (avg-pool), width doubling per level, skip concat.

    Inputs whose sides are not divisible by 2**depth are reflect-padded and cropped back.
    """

    def __init__(self, width: int = 32, depth: int = 2, kernel_size: int = 3, scale: int = 1, blocks_per_level: int = 1):
        super().__init__()
        if depth < 1:
            raise ImitationError(f"student.depth (UNet levels) must be >= 1, got {depth}")
        if kernel_size % 2 == 0:
            raise ImitationError(f"student.kernel_size must be odd, got {kernel_size}")
        widths = [width * 2**i for i in range(depth + 1)]
        self.stem = _Block(3, widths[0], kernel_size, blocks_per_level)
        self.down = nn.ModuleList(_Block(widths[i], widths[i + 1], kernel_size, blocks_per_level) for i in range(depth))
        self.up = nn.ModuleList(
            _Block(widths[i + 1] + widths[i], widths[i], kernel_size, blocks_per_level) for i in reversed(range(depth))
        )
        self.head = _Head(widths[0], kernel_size, scale)
        self.depth = depth
        self.config = {"arch": "unet", "width": width, "depth": depth, "kernel_size": kernel_size,
                       "scale": scale, "blocks_per_level": blocks_per_level}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mult = 2**self.depth
        ph, pw = (-h) % mult, (-w) % mult
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect") if (ph or pw) else x
        feats = [self.stem(xp - 0.5)]
        for block in self.down:
            feats.append(block(F.avg_pool2d(feats[-1], 2)))
        out = feats.pop()
        for block in self.up:
            skip = feats.pop()
            out = block(torch.cat([F.interpolate(out, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        y = self.head(out, xp)
        s = self.head.scale
        return y[..., : s * h, : s * w]


def build_student(arch: str, width: int, depth: int, kernel_size: int = 3, scale: int = 1,
                  blocks_per_level: int = 1) -> nn.Module:
    if arch == "cnn":
        return PlainCNN(width=width, depth=depth, kernel_size=kernel_size, scale=scale)
    if arch == "unet":
        return SmallUNet(width=width, depth=depth, kernel_size=kernel_size, scale=scale, blocks_per_level=blocks_per_level)
    raise ImitationError(f"unknown student.arch {arch!r}: choose 'cnn' or 'unet'")


def receptive_field(student: nn.Module, probe: int = 65) -> int:
    """Side (input pixels) of the region that influences one central output pixel, measured by gradient.

    Measured rather than derived so it holds for any architecture; capped at ``probe``.
    Uses a copy with random head weights (the real head starts at zero, hiding the body).
    """
    import copy

    net = copy.deepcopy(student).float().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * 0.1)
    x = torch.rand(1, 3, probe, probe, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = net(x)
    s = y.shape[-1] // probe
    c = (probe // 2) * s
    y[0, :, c, c].sum().backward()
    g = x.grad[0].abs().sum(0)
    g[probe // 2, probe // 2] = max(float(g[probe // 2, probe // 2]), 1e-30)  # the pixel itself (residual path)
    rows = torch.nonzero(g.sum(1) > 0).flatten()
    cols = torch.nonzero(g.sum(0) > 0).flatten()
    return int(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)


@torch.no_grad()
def apply_student(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Student on a ``(3,H,W)`` or ``(B,3,H,W)`` image in [0,1]; output clipped to [0,1]."""
    was_training = student.training
    student.eval()
    single = x.ndim == 3
    param = next(student.parameters())
    out = student((x[None] if single else x).to(param.device, param.dtype)).clamp(0, 1).float().cpu()
    student.train(was_training)
    return out[0] if single else out


def identity_prediction(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The do-nothing baseline: the input itself (nearest-upsampled for super-resolution)."""
    if scale == 1:
        return x
    return F.interpolate(x[None], scale_factor=scale, mode="nearest")[0]


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------
def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of one ``(3,H,W)`` prediction against its target, both in [0,1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    p, t = pred[None].float().clamp(0, 1), target[None].float().clamp(0, 1)
    return {
        "psnr": float(peak_signal_noise_ratio(p, t, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(p, t, data_range=1.0)),
    }


@dataclass
class HeldoutPair:
    name: str
    x: torch.Tensor  # (3, H, W) teacher input
    y: torch.Tensor  # (3, sH, sW) teacher output
    draw: dict | None = None  # what a blind teacher drew for this image


def heldout_pairs(teacher: Teacher, names: Iterable[str], exclude: Sequence[np.ndarray] = (),
                  crop: int = 256) -> list[HeldoutPair]:
    """Teacher outputs on held-out photographs (central ``crop``; 0 = whole image).

    Any photograph pixel-identical to an image in ``exclude`` (the training example's source)
    is skipped, so aliases (``cat`` is ``chelsea``) cannot leak the example into the test set.
    A blind teacher draws its parameters once per image here, as it would in deployment.
    """
    excluded = {_fingerprint(e) for e in exclude}
    pairs = []
    for name in names:
        full = load_image(name)
        if _fingerprint(full) in excluded:
            continue
        image = center_crop(full, min(crop, *full.shape[:2])) if crop > 0 else full
        n_draws = len(teacher.draws)
        output = teacher(image)
        draw = teacher.draws[-1] if len(teacher.draws) > n_draws else None
        pairs.append(HeldoutPair(name, to_tensor(image), to_tensor(output), draw))
    if not pairs:
        raise ImitationError("no held-out images left after excluding the training example: list more in eval.images")
    return pairs


def evaluate_student(student: nn.Module, pairs: Sequence[HeldoutPair], scale: int) -> dict:
    """Per-image and mean PSNR/SSIM of student(x) vs teacher(x), with the identity baseline."""
    per_image = {}
    for pair in pairs:
        student_m = image_metrics(apply_student(student, pair.x), pair.y)
        identity_m = image_metrics(identity_prediction(pair.x, scale), pair.y)
        per_image[pair.name] = {**student_m, "identity_psnr": identity_m["psnr"], "identity_ssim": identity_m["ssim"]}
        if pair.draw is not None:
            per_image[pair.name]["teacher_draw"] = pair.draw

    def mean(key):
        return float(np.mean([v[key] for v in per_image.values()]))

    return {
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        "psnr_min": float(min(v["psnr"] for v in per_image.values())),
        "identity_psnr": mean("identity_psnr"),
        "identity_ssim": mean("identity_ssim"),
        "per_image": per_image,
    }


# ---------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------
def save_student(student: nn.Module, path: str | Path, **metadata: str) -> None:
    """Weights as safetensors; the architecture travels in the metadata so :func:`load_student` can rebuild it."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"student": json.dumps(student.config), **{k: str(v) for k, v in metadata.items()}}
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(path), metadata=meta)


def load_student(path: str | Path) -> nn.Module:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        config = json.loads(fh.metadata()["student"])
    student = build_student(**config)
    student.load_state_dict(load_file(str(path)))
    return student.eval()
