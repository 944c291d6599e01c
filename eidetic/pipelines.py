"""Diffusers pipelines for export, and loading them back: every trained model loads with ``from_pretrained``.

Latent models export as ``StableDiffusionPipeline`` (DDIM scheduler for sampling). Diffusers
has no text-conditioned pixel-space pipeline, so pixel models export as
:class:`PixelTextToImagePipeline`, loaded with ``PixelTextToImagePipeline.from_pretrained``.

:func:`load_components` is the one loader of a local diffusers text-to-image directory
(training's ``model.pretrained``, protection, imitation and evaluations all go through it);
a directory of the wrong kind is a :class:`~eidetic.errors.ModelLoadError` saying what is
missing. :class:`TextStack` is the one tokenization path (training, sampling, exports).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from eidetic.errors import ModelLoadError
from eidetic.io import atomic_directory

__all__ = [
    "save_pipeline", "PixelTextToImagePipeline", "PIPELINE_COMPONENTS", "TextStack", "PipelineComponents",
    "load_components", "load_vae", "load_diffusion_model",
]

PIPELINE_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


class PixelTextToImagePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 50, guidance_scale: float = 3.0, generator=None, output_type: str = "pil",
                 mitigation=None):
        """``mitigation``: an :class:`eidetic.inference_mitigations.InferenceMitigation` applied while sampling."""
        from eidetic.diffusion import DiffusionModel, generate
        from eidetic.inference_mitigations import mitigate

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        model = DiffusionModel(unet=self.unet, scheduler=self.scheduler, encode_prompt=TextStack(self.tokenizer, self.text_encoder))
        model = mitigate(model, mitigation, tokenizer=self.tokenizer)
        size = self.unet.config.sample_size
        images = generate(model, prompts, (size, size), steps=num_inference_steps, guidance=guidance_scale, generator=generator)
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        arrays = images.permute(0, 2, 3, 1).cpu().float().numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(arrays) if output_type == "pil" else arrays)


def save_pipeline(directory: str | Path, unet, text_encoder, tokenizer, scheduler, vae=None) -> Path:
    """Write a loadable diffusers directory; a crash mid-write leaves the old one intact."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    # steps_offset=1: Stable Diffusion's own setting (its DDIM schedule ends at t=1, not t=0);
    # diffusers flags any other value as an outdated config every time the pipeline loads
    sampling_scheduler = DDIMScheduler.from_config(scheduler.config, steps_offset=1)
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
    with atomic_directory(directory) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(directory)



# ---- text conditioning ----------------------------------------------------------------
class TextStack(torch.nn.Module):
    """Tokenizer + CLIP text encoder: captions -> encoder hidden states (B, L, D).

    Captions are padded to, and cut at, the encoder's context length: the tokenizer's
    ``model_max_length``, capped at the encoder's position embeddings (a third-party tokenizer
    may allow longer inputs than the encoder has positions for).
    """

    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @property
    def max_length(self) -> int:
        return min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def forward(self, captions: Sequence[str], encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Hidden states of ``captions`` from ``encoder`` (default: this stack's own, e.g. an EMA copy instead)."""
        encoder = encoder if encoder is not None else self.text_encoder
        return encoder(self.tokenize(captions).to(encoder.device))[0]

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)


# ---- loading ------------------------------------------------------------------------
@dataclass
class PipelineComponents:
    unet: torch.nn.Module
    text: TextStack
    scheduler: object  # a DDPMScheduler with the directory's noise schedule
    vae: torch.nn.Module | None  # None for pixel-space models

    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text.text_encoder

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def diffusion_model(self, device: str | torch.device = "cpu", frozen: bool = True):
        """The :class:`eidetic.diffusion.DiffusionModel` over these components (on ``device``;
        frozen: eval mode, no gradients)."""
        from eidetic.diffusion import DiffusionModel

        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                module.to(device)
                if frozen:
                    module.eval().requires_grad_(False)
        encode = torch.no_grad()(self.text) if frozen else self.text
        return DiffusionModel(unet=self.unet, scheduler=self.scheduler, encode_prompt=encode, vae=self.vae)


_REQUIRED = {"unet": "the UNet", "text_encoder": "the text encoder", "tokenizer": "the tokenizer", "scheduler": "the scheduler"}


def _check_model_dir(root: Path, require_vae: bool) -> None:
    if not root.is_dir():
        raise ModelLoadError(f"model directory not found: {root} (give a local diffusers text-to-image directory, e.g. a run's model/)")
    required = dict(_REQUIRED, **({"vae": "the autoencoder"} if require_vae else {}))
    missing = [f"{sub}/ ({what})" for sub, what in required.items() if not (root / sub).is_dir()]
    if missing:
        hint = " This needs a latent diffusion model: pixel-space models have no autoencoder." if require_vae and not (root / "vae").is_dir() else ""
        raise ModelLoadError(
            f"{root} is not a diffusers text-to-image directory: missing {', '.join(missing)}. Point at a directory "
            f"written by `save_pipeline`/`StableDiffusionPipeline.save_pretrained` (e.g. a run's model/).{hint}"
        )


def load_components(directory: str | Path, dtype: torch.dtype | None = None, require_vae: bool = False) -> PipelineComponents:
    """The components of a local diffusers text-to-image directory; nothing is downloaded.

    The scheduler is always rebuilt as a ``DDPMScheduler``: exports carry a DDIM sampling
    scheduler, but training and every algorithm here need the training noise schedule,
    which both share. ``vae`` is loaded when ``vae/`` exists (``require_vae``: it must).
    Weights come back trainable (fine-tuning needs that); see
    :meth:`PipelineComponents.diffusion_model` for inference.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(directory)
    _check_model_dir(root, require_vae)
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True, **kw)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler", local_files_only=True))
        vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, **kw) if (root / "vae").exists() else None
    except (OSError, ValueError, KeyError, EnvironmentError) as exc:
        raise ModelLoadError(f"cannot load the model in {root}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return PipelineComponents(unet=unet, text=TextStack(tokenizer, text_encoder), scheduler=scheduler, vae=vae)


def load_vae(directory: str | Path):
    """An AutoencoderKL from its own directory or from a pipeline directory's ``vae/``."""
    from diffusers import AutoencoderKL

    root = Path(directory)
    if (root / "vae" / "config.json").exists():
        root = root / "vae"
    if not (root / "config.json").exists():
        raise ModelLoadError(f"no AutoencoderKL found at {directory} (expected config.json or vae/config.json)")
    try:
        return AutoencoderKL.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the autoencoder in {root}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def load_diffusion_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         require_vae: bool = False):
    """A frozen :class:`eidetic.diffusion.DiffusionModel` from a local diffusers directory (a run's model/)."""
    return load_components(directory, dtype=dtype, require_vae=require_vae).diffusion_model(device)
