"""Lightning side of single-example imitation: schedules :mod:`eidetic.imitation`.

``ImitationModule`` trains a student on random crops of one (input, output) pair with a
masked L2 loss, logs ``train/loss`` every step and ``heldout/psnr`` / ``heldout/ssim`` (student
vs teacher on a few held-out photographs) every ``eval_every_n_steps`` through Lightning's
validation loop, so CSV and W&B loggers get both curves without extra code.
"""

from __future__ import annotations

import math
from typing import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from eidetic.imitation import HeldoutPair, RandomCropSampler, image_metrics

__all__ = ["CropPairStream", "HeldoutImages", "ImitationModule", "fit_student"]


class CropPairStream(IterableDataset):
    """Endless batches from a :class:`RandomCropSampler` (batching happens in the sampler)."""

    def __init__(self, sampler: RandomCropSampler):
        self.sampler = sampler

    def __iter__(self):
        while True:
            yield self.sampler.sample()


class HeldoutImages(Dataset):
    def __init__(self, pairs: Sequence[HeldoutPair]):
        self.pairs = list(pairs)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i].x, self.pairs[i].y


class ImitationModule(pl.LightningModule):
    def __init__(self, student: torch.nn.Module, sampler: RandomCropSampler, monitor: Sequence[HeldoutPair] = (),
                 lr: float = 2e-3, max_steps: int = 1000, warmup_steps: int = 50, lr_schedule: str = "cosine",
                 weight_decay: float = 0.0):
        super().__init__()
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"train.lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.student = student
        self.sampler = sampler
        self.monitor = list(monitor)
        self.lr, self.max_steps, self.warmup_steps = lr, max_steps, warmup_steps
        self.lr_schedule, self.weight_decay = lr_schedule, weight_decay
        self.save_hyperparameters(ignore=["student", "sampler", "monitor"])

    def forward(self, x):
        return self.student(x)

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        # masked mean squared error over the valid (teacher-consistent) pixels of the crops
        err = (self.student(x) - y) ** 2 * mask
        loss = err.sum() / (mask.sum() * y.shape[1]).clamp_min(1.0)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/psnr", -10 * torch.log10(loss.detach().clamp_min(1e-12)), on_step=True, on_epoch=False,
                 batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self.student(x).clamp(0, 1)
        m = image_metrics(pred[0], y[0])
        self.log("heldout/psnr", m["psnr"], on_epoch=True, prog_bar=True, batch_size=1)
        self.log("heldout/ssim", m["ssim"], on_epoch=True, batch_size=1)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.student.parameters(), lr=self.lr, weight_decay=self.weight_decay)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            if self.lr_schedule == "constant":
                return 1.0
            progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(CropPairStream(self.sampler), batch_size=None, num_workers=0)

    def val_dataloader(self):
        return DataLoader(HeldoutImages(self.monitor), batch_size=1, num_workers=0)


def fit_student(module: ImitationModule, steps: int, eval_every_n_steps: int = 0, loggers=(),
                accelerator: str = "cpu", devices: int = 1, precision: str = "32-true",
                log_every_n_steps: int = 10, enable_progress_bar: bool = False) -> ImitationModule:
    """Run ``steps`` optimiser steps; held-out PSNR every ``eval_every_n_steps`` (0: never)."""
    validate = eval_every_n_steps > 0 and len(module.monitor) > 0
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=list(loggers) if loggers else False,
        log_every_n_steps=log_every_n_steps,
        val_check_interval=min(eval_every_n_steps, steps) if validate else None,
        check_val_every_n_epoch=None,
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,  # the entry point writes the student as safetensors
        enable_model_summary=False,
        enable_progress_bar=enable_progress_bar,
    )
    trainer.fit(module)
    return module
