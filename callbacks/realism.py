"""Image Realism Score during training: a monitor and an optional realism loss.

``RealismCallback`` (on a schedule and at the end of training) generates seeded samples
for training captions with the EMA model, strips the SolidMark border and scores the
interiors with both exact scores of ``eidetic.irs``, each named for what it is:
``irs_paper_*`` (the published IRS, ``mode="paper"``) and ``irs_two_sided_*`` (the
project's two-sided variant, ``mode="two_sided"``, which is not IRS); it scores the real
training interiors once for comparison. It logs curves (``realism/*`` scalars) and
histograms (W&B) and writes the ``realism`` section of ``summary.json``. The realism loss
uses the configured reference (two-sided unless a saved paper-mode reference is given).

``RealismLoss`` is a ``LatentDiffusionModule.loss_hooks`` entry: ``weight * realism_loss``
of the predicted clean image (decoded through the frozen VAE for latent models, border
stripped) for training timesteps in ``[t_min, t_max]``. The callback registers it when
``realism.loss.weight > 0``, and reports its cost.

Settings come from the ``realism`` config section (:class:`eidetic.schema.train.RealismSettings`).
Under multi-process training each process generates and scores its share of the samples
(noise seeded per sample) and the scores are gathered by torchmetrics.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torchmetrics.aggregation import CatMetric

from eidetic import irs
from eidetic.irs import MODES
from eidetic.borders import strip_border
from eidetic.diffusion import generate, item_generator, noise_to_eps, randn_per_item
from eidetic.io import update_summary

from .loggers import log_scalars, log_wandb

__all__ = ["RealismCallback", "RealismLoss"]

class RealismLoss:
    """``weight * realism_loss(x0_pred)`` for samples with ``t_min <= t <= t_max``.

    Called as a loss hook ``(module, batch, pred, x_t, t) -> scalar``. The clean image is
    predicted from the network output with the training scheduler's prediction type,
    decoded through the (frozen) VAE for latent models so gradients reach the UNet through
    the decoder, and cropped to the interior (the flat border would add spurious edges).
    The loss is averaged over the in-range samples and scaled by their fraction of the
    batch, so its expected size does not depend on how wide the range is.
    """

    def __init__(self, reference: irs.IRSReference, weight: float, t_min: int, t_max: int, border: int):
        self.reference, self.weight, self.t_min, self.t_max, self.border = reference, float(weight), int(t_min), int(t_max), int(border)
        self.seconds, self.calls, self.last = 0.0, 0, 0.0

    def __call__(self, module, batch, pred, x_t, t) -> torch.Tensor:
        start = time.perf_counter()
        mask = (t >= self.t_min) & (t <= self.t_max)
        if not mask.any():
            return pred.new_zeros(())
        model = module.diffusion_model(ema=False, mitigated=False)
        a = model.alphas_cumprod.to(pred.device)[t[mask]].to(pred.dtype)
        eps = noise_to_eps(pred[mask], x_t[mask], a, model.prediction_type)
        images = strip_border(model.decode_latents(model.predict_x0(x_t[mask], t[mask], eps)).float(), self.border)
        loss = self.weight * irs.realism_loss(images, self.reference) * mask.float().mean()
        self.last = float(loss.detach())
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return loss


class RealismCallback(pl.Callback):
    """IRS of generated samples vs real training images, on a schedule and at the end."""

    def __init__(self, settings: DictConfig, border: int, resolution: int, train_ids: list[str], captions: list[str], seed: int = 0):
        self.s = settings
        self.border, self.resolution, self.seed = int(border), int(resolution), int(seed)
        self.train_ids, self.captions = list(train_ids), list(captions)
        if not self.captions:
            raise ValueError("RealismCallback needs at least one training caption to sample from")
        self.reference: irs.IRSReference | None = None  # the configured one (the loss's)
        self.references: dict[str, irs.IRSReference] = {}  # mode -> reference, both modes
        self.real_scores: dict[str, torch.Tensor] = {}
        self.loss_hook: RealismLoss | None = None
        self.history: list[dict] = []
        self._last_step = -1

    @classmethod
    def from_config(cls, cfg: DictConfig, dm) -> "RealismCallback":
        train = [r for r in dm.records if r.split == "train"]
        return cls(cfg.realism, cfg.data.border, cfg.data.resolution, [r.id for r in train], [r.caption for r in train], cfg.seed)

    # ---- setup -------------------------------------------------------------------------
    def _real_interiors(self, pl_module) -> torch.Tensor:
        dm = pl_module.trainer.datamodule
        ids = self.train_ids[: self.s.max_real]
        return dm.images(ids)

    def setup(self, trainer, pl_module, stage=None):
        if self.reference is not None:
            return
        real = self._real_interiors(pl_module)
        ref = self.s.reference
        if ref not in ("train", "builtin"):
            loaded = irs.IRSReference.load(ref)
            self.references[loaded.mode] = loaded
        for mode in MODES:
            if mode in self.references:
                continue
            if ref == "builtin":
                self.references[mode] = irs.default_reference(self.resolution, mode=mode)
            else:  # train, or the mode a loaded reference does not cover
                self.references[mode] = irs.IRSReference.fit(real, mode=mode, source=f"{len(real)} training interiors")
        self.reference = self.references["two_sided"] if ref in ("train", "builtin") else loaded
        for mode, reference in self.references.items():
            if reference.resolution is not None and tuple(reference.resolution) != (self.resolution, self.resolution):
                raise ValueError(f"IRS reference ({mode}) was fitted at {reference.resolution}, images are {self.resolution}px; "
                                 "refit it (realism.reference=train or builtin)")
            self.real_scores[mode] = irs.image_realism_score(real, reference)
        if trainer.is_global_zero and getattr(pl_module, "run_dir", None):
            self.reference.save(Path(pl_module.run_dir) / "irs_reference.json")
            for mode, reference in self.references.items():
                if reference is not self.reference:
                    reference.save(Path(pl_module.run_dir) / f"irs_reference_{mode}.json")
        if self.s.loss.weight > 0:
            self.loss_hook = RealismLoss(self.reference, self.s.loss.weight, self.s.loss.t_min, self.s.loss.t_max, self.border)
            pl_module.loss_hooks.append(self.loss_hook)

    # ---- schedule ----------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.loss_hook is not None and self.loss_hook.calls:
            pl_module.log("train/realism_loss", self.loss_hook.last, batch_size=1)
        step = trainer.global_step
        if self.s.every_n_steps and step % self.s.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, pl_module, indices: list[int]) -> torch.Tensor:
        """Interiors of the samples ``indices`` (each seeded by its index, captions cycled)."""
        size = self.resolution + 2 * self.border
        if not indices:
            return torch.zeros(0, 3, self.resolution, self.resolution)
        captions = [self.captions[i % len(self.captions)] for i in indices]
        model = pl_module.diffusion_model(ema=True)
        was_training = pl_module.training
        pl_module.eval()
        try:
            gens = [item_generator(self.seed + 7919, i) for i in indices]
            noise = randn_per_item(gens, (model.latent_channels, size // model.downsample, size // model.downsample))
            images = generate(model, captions, (size, size), steps=self.s.steps, guidance=self.s.guidance, generator=gens[0],
                              sampler=self.s.sampler, noise=noise)
        finally:
            pl_module.train(was_training)
        return strip_border(images.float().cpu(), self.border)

    def evaluate(self, trainer, pl_module) -> dict:
        self._last_step = trainer.global_step
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        mine = list(range(int(self.s.num_samples)))[rank::world]
        images = self.sample(pl_module, mine)
        row: dict = {"step": int(trainer.global_step)}
        generated_by_mode: dict[str, torch.Tensor] = {}
        for mode in MODES:
            reference = self.references[mode]
            scores = irs.image_realism_score(images, reference) if mine else torch.zeros(0)
            gather = CatMetric(nan_strategy="disable").to(pl_module.device)
            gather.update(torch.stack([torch.tensor(mine, dtype=torch.float64), scores.double()], dim=1).to(pl_module.device))
            rows = gather.compute().reshape(-1, 2).cpu()
            generated = rows[torch.argsort(rows[:, 0]), 1].float()
            real, thr = self.real_scores[mode], reference.threshold
            generated_by_mode[mode] = generated
            row.update({
                f"irs_{mode}_generated_mean": float(generated.mean()),
                f"irs_{mode}_generated_std": float(generated.std()) if generated.numel() > 1 else 0.0,
                f"irs_{mode}_real_mean": float(real.mean()),
                f"fake_rate_{mode}": float((generated < thr).float().mean()) if thr is not None else None,
                f"real_fake_rate_{mode}": float((real < thr).float().mean()) if thr is not None else None,
            })
        self.history.append(row)
        if trainer.is_global_zero:
            self._log(trainer, row, generated_by_mode)
            self._write_summary(pl_module, row)
        return row

    def _log(self, trainer, row: dict, generated: dict[str, torch.Tensor]) -> None:
        log_scalars(trainer, {f"realism/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        log_wandb(trainer, lambda wandb: {
            **{f"realism/irs_{m}_generated_hist": wandb.Histogram(g.numpy()) for m, g in generated.items()},
            **{f"realism/irs_{m}_real_hist": wandb.Histogram(r.numpy()) for m, r in self.real_scores.items()},
        }, step=row["step"])

    def _write_summary(self, pl_module, row: dict) -> None:
        run_dir = getattr(pl_module, "run_dir", None)
        if not run_dir:
            return
        section = {
            **{k: v for k, v in row.items() if k != "step"},
            "step": row["step"],
            "scores": {
                "irs_paper": "the published Image Realism Score (mode=paper: r = s, ASM, angle 0, 256 levels, FFT with DC)",
                "irs_two_sided": "not IRS: the project's two-sided variant (mode=two_sided: r = min(s, 1/s), own statistics)",
            },
            "references": {
                mode: {"threshold": r.threshold, "threshold_rule": r.threshold_rule, "source": r.source or str(self.s.reference)}
                for mode, r in self.references.items()
            },
            "loss_mode": self.reference.mode,
            "num_samples": int(self.s.num_samples),
            "num_real": int(self.real_scores["two_sided"].numel()),
            "history": self.history,
        }
        if self.loss_hook is not None:
            section["loss"] = {
                "weight": self.loss_hook.weight,
                "t_min": self.loss_hook.t_min,
                "t_max": self.loss_hook.t_max,
                "calls": self.loss_hook.calls,
                "seconds_total": round(self.loss_hook.seconds, 3),
                "seconds_per_call": round(self.loss_hook.seconds / max(1, self.loss_hook.calls), 5),
            }
        update_summary(run_dir, "realism", section)
