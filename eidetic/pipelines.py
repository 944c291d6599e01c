"""Diffusers pipelines for export: every trained model loads with ``from_pretrained``.

Latent models export as ``StableDiffusionPipeline`` (DDIM scheduler for sampling). Diffusers
has no text-conditioned pixel-space pipeline, so pixel models export as
:class:`PixelTextToImagePipeline`, loaded with ``PixelTextToImagePipeline.from_pretrained``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

__all__ = ["save_pipeline", "PixelTextToImagePipeline"]


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

