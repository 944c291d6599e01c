"""The one place callbacks talk to loggers: scalars to every logger; images, tables and
histograms to W&B (and the sample images to any logger that takes images)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["log_scalars", "wandb_run", "log_wandb", "log_figure", "log_image", "to_uint8"]


def log_scalars(trainer, metrics: dict[str, float], step: int | None = None) -> None:
    step = trainer.global_step if step is None else step
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


def wandb_run(trainer):
    """The W&B run of the trainer's W&B logger, or None (no W&B logger, or not rank 0)."""
    from lightning.pytorch.loggers import WandbLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def log_wandb(trainer, payload_fn, step: int | None = None) -> None:
    """``payload_fn(wandb) -> dict`` logged to W&B at ``step``; nothing is built without a W&B run."""
    run = wandb_run(trainer)
    if run is None:
        return
    import wandb

    run.log(payload_fn(wandb), step=trainer.global_step if step is None else step)


def log_figure(trainer, key: str, make_figure, step: int | None = None) -> None:
    """A figure of :mod:`eidetic.figures` (``make_figure() -> Figure | None``) to W&B as an
    image: the same picture the run report shows. Nothing is drawn without a W&B run."""
    if wandb_run(trainer) is None:
        return

    def payload(wandb):
        import io

        from PIL import Image

        from eidetic.figures import figure_png

        fig = make_figure()
        return {key: wandb.Image(Image.open(io.BytesIO(figure_png(fig))))} if fig is not None else {}

    log_wandb(trainer, payload, step=step)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def log_image(trainer, key: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int | None = None) -> None:
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=list(images), caption=list(captions), step=step)
