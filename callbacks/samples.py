"""Validation sample grids for fixed captions, with EMA weights."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from eidetic.diffusion import generate
from eidetic.io import atomic_write, write_json_atomic

from .loggers import log_image

__all__ = ["SampleGridCallback", "save_grid"]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 4) -> Image.Image:
    """(B, 3, H, W) in [-1, 1] -> a PNG grid (rows of ``nrow``)."""
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, c, h, w = x.shape
    rows = (b + nrow - 1) // nrow
    grid = torch.full((c, rows * h + (rows - 1) * 2, nrow * w + (nrow - 1) * 2), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 2) : r * (h + 2) + h, col * (w + 2) : col * (w + 2) + w] = x[i]
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    with atomic_write(path, "wb") as fh:
        image.save(fh, format="PNG")
    return image


class SampleGridCallback(pl.Callback):
    """Every ``every_n_steps`` and at the end: one sample per validation caption, saved as
    ``samples/step-XXXXXX.png`` and logged to W&B. Seeded, so grids are comparable."""

    def __init__(self, captions: list[str], every_n_steps: int, steps: int, guidance: float, sampler: str, seed: int, size: int):
        self.captions, self.every_n_steps = list(captions), every_n_steps
        self.steps, self.guidance, self.sampler, self.seed, self.size = steps, guidance, sampler, seed, size
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    def sample(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero or not self.captions:
            return
        model = pl_module.diffusion_model(ema=True)
        was_training = pl_module.training
        pl_module.eval()
        g = torch.Generator().manual_seed(self.seed)
        images = generate(model, self.captions, (self.size, self.size), steps=self.steps, guidance=self.guidance, generator=g, sampler=self.sampler)
        pl_module.train(was_training)
        path = Path(pl_module.run_dir) / "samples" / f"step-{trainer.global_step:06d}.png"
        grid = save_grid(images, path)
        write_json_atomic(path.parent / "captions.json", self.captions)  # what the grids show, in order
        log_image(trainer, "samples", [np.asarray(grid)], [" | ".join(self.captions)])
