"""LoRA adapters on a diffusers UNet and a CLIP text encoder, through peft as diffusers uses them.

:func:`add_lora` freezes a module and injects low-rank adapters into the named submodules
(peft's matching: a module's name or its dotted suffix, e.g. ``to_q`` or ``to_out.0``);
names that match nothing are a :class:`~eidetic.errors.ConfigError` listing what the
model has. :func:`save_lora` writes the adapters in the format
``StableDiffusionPipeline.load_lora_weights`` loads onto the base model, and
:func:`merge_lora` writes a full pipeline with the adapters fused into the base weights.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import torch

from eidetic.errors import ConfigError
from eidetic.io import atomic_directory

__all__ = ["LORA_WEIGHTS", "missing_targets", "add_lora", "lora_parameters", "lora_state_dict", "save_lora", "merge_lora"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def missing_targets(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """The entries of ``targets`` that name no ``nn.Linear`` or ``nn.Conv2d`` of ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [t for t in targets if not any(_matches(n, t) for n in names)]


def _leaf_names(model: torch.nn.Module) -> list[str]:
    """Distinct adaptable module names with their numeric path parts dropped (``attn1.to_q`` -> ``to_q``)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            parts = name.split(".")
            tail = parts[-1] if not parts[-1].isdigit() or len(parts) < 2 else ".".join(parts[-2:])
            out.append(tail)
    return sorted(dict.fromkeys(out))


def add_lora(model: torch.nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
             setting: str = "model.lora.target_modules") -> int:
    """Freeze ``model`` and add LoRA adapters to ``targets``; returns the number of adapter parameters.

    The adapters start as diffusers' training scripts start them (``init_lora_weights="gaussian"``:
    A random, B zero), so the adapted model equals the base model before the first step.
    """
    from peft import LoraConfig, inject_adapter_in_model

    missing = missing_targets(model, targets)
    if missing:
        available = _leaf_names(model)
        hints = [f"{m!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(m, available, n=1)) else repr(m) for m in missing]
        raise ConfigError(
            f"{setting} names modules that {type(model).__name__} does not have: {', '.join(hints)}. "
            f"Its linear/conv modules are named: {', '.join(available)}"
        )
    model.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), init_lora_weights="gaussian",
                        target_modules=list(targets))
    if hasattr(model, "add_adapter") and type(model).__module__.startswith("diffusers"):
        model.add_adapter(config)  # diffusers' own path: sets the flags fuse/unload rely on
    else:
        # transformers' add_adapter demands a newer peft than the one the pinned torch allows;
        # peft's injection is what it calls underneath
        inject_adapter_in_model(config, model)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of ``model`` in diffusers' key format (what ``save_lora_weights`` takes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora(directory: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write ``unet``'s (and ``text_encoder``'s) adapters where ``load_lora_weights(directory)`` finds them."""
    from diffusers import StableDiffusionPipeline

    with atomic_directory(directory) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=tmp, unet_lora_layers=lora_state_dict(unet),
            text_encoder_lora_layers=lora_state_dict(text_encoder) if text_encoder is not None else None,
            weight_name=LORA_WEIGHTS, safe_serialization=True,
        )
    return Path(directory)


def merge_lora(base: str | Path, lora: str | Path, directory: str | Path) -> Path:
    """A full pipeline in ``directory``: the base model of ``base`` with the adapters of ``lora`` fused in."""
    from diffusers import StableDiffusionPipeline

    from eidetic.pipelines import save_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora, weight_name=LORA_WEIGHTS)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return save_pipeline(directory, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, vae=pipe.vae)

