"""Autoencoder stage: train an AutoencoderKL on the bordered images, then freeze it."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

__all__ = ["AutoencoderModule", "fit_latent_scale"]


class AutoencoderModule(pl.LightningModule):
    """L1 + MSE reconstruction with a small KL term (the usual LDM first stage, minus the
    GAN/perceptual losses that need pretrained networks)."""

    def __init__(self, vae, lr: float, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.lr = lr
        self.kl_weight = kl_weight

    def training_step(self, batch, batch_idx):
        x = batch["pixel_values"]
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + self.kl_weight * kl
        self.log_dict({"vae/loss": loss, "vae/recon": rec, "vae/kl": kl}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)


@torch.no_grad()
def fit_latent_scale(vae, batches) -> float:
    """1 / std of the latents, as Stable Diffusion chose its 0.18215: unit-variance latents."""
    latents = torch.cat([vae.encode(b["pixel_values"]).latent_dist.mean for b in batches])
    return float(1.0 / latents.flatten().std().clamp_min(1e-6))
