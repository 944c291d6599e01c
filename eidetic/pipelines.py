"""Diffusers pipelines for export, and loading them back: every trained model loads with ``from_pretrained``.

Latent models export as ``StableDiffusionPipeline`` (DDIM scheduler for sampling). Diffusers
has no text-conditioned pixel-space pipeline, so pixel models export as
:class:`PixelTextToImagePipeline`, loaded with ``PixelTextToImagePipeline.from_pretrained``.

:func:`load_components` is the one loader of a local diffusers text-to-image directory
(training's ``model.pretrained``, protection, imitation and evaluations all go through it);
callers check the directory first and word the error for their own context.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

__all__ = ["save_pipeline", "PixelTextToImagePipeline", "PIPELINE_COMPONENTS", "PipelineComponents", "load_components", "prompt_encoder", "frozen_diffusion_model"]

PIPELINE_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


class PixelTextToImagePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 50, guidance_scale: float = 3.0, generator=None, output_type: str = "pil"):
        from eidetic.diffusion import DiffusionModel, generate

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        model = DiffusionModel(unet=self.unet, scheduler=self.scheduler, encode_prompt=self._encode)
        size = self.unet.config.sample_size
        images = generate(model, prompts, (size, size), steps=num_inference_steps, guidance=guidance_scale, generator=generator)
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        arrays = images.permute(0, 2, 3, 1).cpu().float().numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(arrays) if output_type == "pil" else arrays)

    def _encode(self, captions):
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


def save_pipeline(directory: str | Path, unet, text_encoder, tokenizer, scheduler, vae=None) -> Path:
    """Write a loadable diffusers directory; a crash mid-write leaves the old one intact."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    sampling_scheduler = DDIMScheduler.from_config(scheduler.config)
    if vae is not None:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sampling_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = PixelTextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sampling_scheduler)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory



# ---- loading ------------------------------------------------------------------------
@dataclass
class PipelineComponents:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # a DDPMScheduler with the directory's noise schedule
    vae: torch.nn.Module | None  # None for pixel-space models


def load_components(directory: str | Path, dtype: torch.dtype | None = None) -> PipelineComponents:
    """The components of a local diffusers text-to-image directory; nothing is downloaded.

    The scheduler is always rebuilt as a ``DDPMScheduler``: exports carry a DDIM sampling
    scheduler, but training and every algorithm here need the training noise schedule,
    which both share. ``vae`` is loaded when ``vae/`` exists. Weights come back trainable
    (fine-tuning needs that); :func:`frozen_diffusion_model` freezes them for inference.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(directory)
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True, **kw)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler", local_files_only=True))
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, **kw) if (root / "vae").exists() else None
    return PipelineComponents(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)


def prompt_encoder(tokenizer, text_encoder) -> Callable[[Sequence[str]], torch.Tensor]:
    """captions -> (B, L, D) hidden states, on whatever device the encoder is on."""
    # a third-party tokenizer may allow longer inputs than the encoder has positions for
    max_length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))

    @torch.no_grad()
    def encode_prompt(captions: Sequence[str]) -> torch.Tensor:
        ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids.to(text_encoder.device))[0]

    return encode_prompt


def frozen_diffusion_model(parts: PipelineComponents, device: str | torch.device = "cpu"):
    """An :class:`eidetic.diffusion.DiffusionModel` for inference: on ``device``, eval mode, no gradients."""
    from eidetic.diffusion import DiffusionModel

    for module in (parts.unet, parts.text_encoder, parts.vae):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return DiffusionModel(unet=parts.unet, scheduler=parts.scheduler, encode_prompt=prompt_encoder(parts.tokenizer, parts.text_encoder), vae=parts.vae)
