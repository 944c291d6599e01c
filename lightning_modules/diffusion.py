"""What Lightning trains: a text-conditioned latent (or pixel) diffusion model."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from eidetic.diffusion import DiffusionModel
from eidetic.ema import EMA
from eidetic.losses import diffusion_target, min_snr_weights, offset_noise

__all__ = ["LatentDiffusionModule"]


class LatentDiffusionModule(pl.LightningModule):
    """UNet2DConditionModel + CLIP text encoder (+ frozen AutoencoderKL) + DDPM training.

    Noise, timesteps and caption dropout come from a generator seeded by
    (seed, global step, micro-batch), so a resumed run draws exactly what an uninterrupted
    run would: resume equivalence does not depend on restoring global RNG state.
    Memorization tooling gets the model through :meth:`diffusion_model` (EMA weights by
    default), never by reaching into attributes.

    Callbacks extend training through four lists of hooks, applied in order:

    * ``batch_transforms``: ``(module, batch, batch_idx) -> batch`` (captions, images, weights);
    * ``embedding_transforms``: ``(module, hidden, batch_idx) -> hidden``;
    * ``sample_filters``: ``(module, batch, x_t, t, hidden) -> keep mask`` (B,);
    * ``loss_hooks``: ``(module, batch, pred, x_t, t) -> extra loss`` (``pred`` is the raw network output).
    """

    def __init__(self, cfg: DictConfig, unet, text, scheduler, vae=None, run_dir: str | Path | None = None):
        super().__init__()
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.unet = unet
        self.text = text
        self.scheduler = scheduler
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False).eval()
        self.train_text = bool(cfg.model.text.train) and not cfg.model.pretrained
        if not self.train_text:
            self.text.text_encoder.requires_grad_(False)
        ema = cfg.train.ema
        self.ema_unet = EMA(unet, ema.decay, ema.warmup) if ema.enabled else None
        self.ema_text = EMA(text.text_encoder, ema.decay, ema.warmup) if ema.enabled and self.train_text else None
        self.batch_transforms: list = []
        self.embedding_transforms: list = []
        self.sample_filters: list = []
        self.loss_hooks: list = []
        # from_pretrained hands modules back in eval mode: what is trained must train (dropout on)
        self.train()

    # ---- model access ------------------------------------------------------------------
    def diffusion_model(self, ema: bool = True) -> DiffusionModel:
        """The model as every memorization algorithm sees it (EMA weights by default)."""
        unet = self.ema_unet.shadow if (ema and self.ema_unet is not None) else self.unet
        encoder = self.ema_text.shadow if (ema and self.ema_text is not None) else self.text.text_encoder
        return DiffusionModel(unet=unet, scheduler=self.scheduler, encode_prompt=lambda captions: self.text(captions, encoder=encoder), vae=self.vae)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen: never let its norm layers drift
        if not self.train_text:
            self.text.eval()  # frozen text encoder: no dropout in its embeddings
        return self

    # ---- frozen modules ----------------------------------------------------------------
    def frozen_prefixes(self) -> tuple[str, ...]:
        """Submodules kept in eval mode on purpose: the frozen autoencoder, the EMA shadows
        (sampled from, never trained) and a text encoder that is not trained."""
        prefixes = ["vae", "ema_unet", "ema_text"]
        if not self.train_text:
            prefixes.append("text")
        return tuple(prefixes)

    def unexpected_eval_modules(self) -> list[str]:
        frozen = self.frozen_prefixes()
        return [n for n, m in self.named_modules() if not m.training and n.split(".", 1)[0] not in frozen]

    _EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode when training starts (just after this
        # hook) and offers no way to declare frozen ones; when only the frozen modules above are
        # in eval mode the warning is about them, so it is silenced until training has started
        import warnings

        self._end_quiet_start()
        if not self.unexpected_eval_modules():
            self._quiet_start = warnings.catch_warnings()
            self._quiet_start.__enter__()
            warnings.filterwarnings("ignore", message=self._EVAL_MODE_WARNING)

    def _end_quiet_start(self) -> None:
        quiet = getattr(self, "_quiet_start", None)
        self._quiet_start = None
        if quiet is not None:
            quiet.__exit__(None, None, None)

    def on_train_start(self) -> None:
        self._end_quiet_start()

    def teardown(self, stage: str) -> None:
        self._end_quiet_start()  # a fit that failed before training started

    # ---- training ----------------------------------------------------------------------
    def _generator(self, batch_idx: int) -> torch.Generator:
        micro = batch_idx % max(1, self.cfg.train.grad_accum)
        seed = (self.cfg.seed * 1_000_003 + self.global_step * 1_009 + micro) % (2**63)
        return torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def encode_batch(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training latents: a sample of the VAE posterior (scaled), or the pixels themselves."""
        if self.vae is None:
            return pixels
        dist = self.vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        return (dist.mean + dist.std * eps) * self.vae.config.scaling_factor

    def training_step(self, batch, batch_idx):
        cfg = self.cfg.train
        g = self._generator(batch_idx)
        for transform in self.batch_transforms:
            batch = transform(self, batch, batch_idx)
        x0 = self.encode_batch(batch["pixel_values"], g)
        b = x0.shape[0]
        noise = offset_noise(tuple(x0.shape), cfg.noise_offset, g, self.device).to(x0.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=g).to(self.device)
        drop = torch.rand(b, generator=g) < cfg.caption_dropout
        hidden = self.text(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
        for transform in self.embedding_transforms:
            hidden = transform(self, hidden, batch_idx)
        x_t = self.scheduler.add_noise(x0, noise, t)

        keep = torch.ones(b, dtype=torch.bool, device=self.device)
        for sample_filter in self.sample_filters:
            keep &= sample_filter(self, batch, x_t, t, hidden)

        pred = self.unet(x_t, t, encoder_hidden_states=hidden).sample
        target = diffusion_target(self.scheduler, x0, noise, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            per_sample = per_sample * min_snr_weights(self.scheduler, t, cfg.min_snr_gamma, self.scheduler.config.prediction_type)
        weights = keep.float() * batch.get("loss_weight", torch.ones(b, device=self.device))
        loss = (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
        for hook in self.loss_hooks:
            loss = loss + hook(self, batch, pred, x_t, t)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        if not keep.all():
            self.log("train/skipped", (~keep).float().sum(), reduce_fx="sum", batch_size=b)
        return loss

    def on_before_zero_grad(self, optimizer):
        # Runs right after each optimizer step (once per accumulated step), before any
        # callback sees the step: checkpoints taken at on_train_batch_end include this update.
        if self.ema_unet is not None:
            self.ema_unet.update(self.unet)
        if self.ema_text is not None:
            self.ema_text.update(self.text.text_encoder)

    def configure_optimizers(self):
        cfg = self.cfg.train
        params = list(self.unet.parameters())
        if self.train_text:
            params += list(self.text.text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = max(1, cfg.max_steps)
        warmup = max(0, cfg.lr_warmup_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if cfg.lr_schedule == "cosine":
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- export ------------------------------------------------------------------------
    def export_pipeline(self, directory: str | Path, ema: bool = True) -> Path:
        from eidetic.pipelines import save_pipeline

        unet = self.ema_unet.shadow if (ema and self.ema_unet is not None) else self.unet
        encoder = self.ema_text.shadow if (ema and self.ema_text is not None) else self.text.text_encoder
        return save_pipeline(directory, unet=unet, text_encoder=encoder, tokenizer=self.text.tokenizer, scheduler=self.scheduler, vae=self.vae)
