"""The one interface every memorization algorithm uses to talk to a diffusion model.

``DiffusionModel`` bundles a denoiser (a diffusers ``UNet2DConditionModel`` or anything
with the same call signature, such as :class:`eidetic.oracle.EmpiricalDenoiser`), the
training noise scheduler, an optional text encoder and an optional VAE. Pixel-space models
have ``vae=None``. All images crossing this interface are (B, 3, H, W) in [-1, 1]; latents
are already multiplied by the VAE scaling factor.

It counts UNet evaluations: one evaluation is one image through the network; the
conditional and unconditional halves of a classifier-free-guided prediction are one
batched call and count as one evaluation per image (as in Webster 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = ["DiffusionModel", "generate", "noise_to_eps", "item_generator", "randn_per_item"]


def noise_to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a network output of any prediction type into an epsilon prediction."""
    a = alpha_bar.view(-1, *([1] * (x_t.ndim - 1)))
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def item_generator(seed: int, *ids: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, ids): noise seeded per item (image,
    caption, sample) does not depend on batch size, order or how items are split across
    processes."""
    import numpy as np

    words = [int(seed) & 0xFFFFFFFF, *[int(i) & 0xFFFFFFFF for i in ids]]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def randn_per_item(generators: Sequence[torch.Generator], shape: tuple[int, ...], device=None) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per generator, stacked (drawn on the CPU)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@dataclass
class DiffusionModel:
    unet: Callable
    scheduler: object
    encode_prompt: Callable[[Sequence[str]], torch.Tensor]
    vae: object | None = None
    # unet_evals: noise predictions per image (a guided step is one); unet_passes: network forward
    # passes per image (a guided step is two), the compute a sampling setting actually costs
    unet_evals: int = field(default=0, init=False)
    unet_passes: int = field(default=0, init=False)

    # ---- geometry -------------------------------------------------------------------
    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def device(self) -> torch.device:
        return next(iter(self._parameters_of(self.unet)), torch.zeros(())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._parameters_of(self.unet)), torch.zeros(())).dtype

    @staticmethod
    def _parameters_of(module):
        if hasattr(module, "parameters"):
            yield from module.parameters()
        if hasattr(module, "buffers"):
            yield from module.buffers()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def downsample(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        if self.vae is not None:
            return int(self.vae.config.latent_channels)
        return int(self.unet.config.in_channels)

    # ---- encode / decode ------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the space the UNet works in (scaled VAE latent means)."""
        if self.vae is None:
            return images
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(images.to(vae_dtype)).latent_dist.mean
        return latents * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.latent_scale).sample

    # ---- the network ----------------------------------------------------------------
    def predict_noise(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Epsilon prediction, with classifier-free guidance in one batched call."""
        b = x_t.shape[0]
        t = torch.as_tensor(timesteps, device=x_t.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        use_cfg = uncond is not None and guidance != 1.0
        if use_cfg:
            if uncond.shape[0] == 1 and b > 1:
                uncond = uncond.expand(b, *uncond.shape[1:])
            out = self._unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        else:
            out = self._unet(x_t, t, cond)
        self.unet_evals += b
        alpha_bar = self.alphas_cumprod.to(x_t.device)[t.long()].to(out.dtype)
        return noise_to_eps(out, x_t, alpha_bar, self.prediction_type)

    def _unet(self, sample, t, hidden):
        dtype = self.dtype
        self.unet_passes += sample.shape[0]
        out = self.unet(sample.to(dtype), t, encoder_hidden_states=hidden.to(dtype))
        out = out.sample if hasattr(out, "sample") else out
        return out.float() if sample.dtype == torch.float32 else out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process q(x_t | x0) at ``timesteps``: the training scheduler's own ``add_noise``."""
        return self.scheduler.add_noise(x0, noise, torch.as_tensor(timesteps).long().reshape(-1))

    def predict_x0(self, x_t: torch.Tensor, timesteps: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The clean-image estimate (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM eq. 15)."""
        t = torch.as_tensor(timesteps, device=x_t.device).long().reshape(-1)
        a = self.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


@torch.no_grad()
def generate(
    model: DiffusionModel,
    captions: Sequence[str],
    shape: tuple[int, int],
    steps: int = 50,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    sampler: str = "ddim",
    step_hook: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    decode: bool = True,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample images (B, 3, H, W) in [-1, 1] for ``captions``.

    ``shape`` is the image size (H, W) in pixels. ``sampler`` is ``"ddim"`` (deterministic
    given the initial noise) or ``"ddpm"`` (ancestral). ``noise`` (B, C, h, w), if given, is
    the initial noise (else drawn from ``generator``). ``step_hook(x, t_next, i)`` may
    rewrite the working tensor after every step (inpainting-style replacement).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}.get(sampler)
    if cls is None:
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    # predict_noise always returns epsilon; latents are not bounded, so never clip them.
    scheduler = cls.from_config(model.scheduler.config, prediction_type="epsilon", clip_sample=not model.is_latent)
    scheduler.set_timesteps(steps)
    device = model.device
    h, w = shape
    f = model.downsample
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's factor {f}")
    cond = model.encode_prompt(list(captions))
    uncond = model.encode_prompt([""]) if guidance != 1.0 else None
    # noise is drawn on the CPU so a seed gives the same images on every device
    if noise is None:
        noise = torch.randn((len(captions), model.latent_channels, h // f, w // f), generator=generator)
    x = noise.to(device)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        eps = model.predict_noise(x, t.to(device), cond, uncond, guidance)
        kwargs = {"generator": generator} if sampler == "ddpm" else {"eta": 0.0}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if step_hook is not None:
            t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
            x = step_hook(x, t_next, i)
    if not decode:
        return x
    return model.decode_latents(x).clamp(-1, 1)
