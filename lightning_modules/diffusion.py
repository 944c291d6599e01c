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
from eidetic.inference_mitigations import InferenceMitigation, mitigate
from eidetic.errors import ConfigError
from eidetic.losses import diffusion_target, min_snr_weights, offset_noise

__all__ = ["LatentDiffusionModule", "weight_dtype", "check_optimizer", "make_optimizer"]

# the dtype frozen weights are stored in under each mixed precision (autocast computes in it anyway)
_MIXED_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype frozen modules (VAE, frozen text encoder, LoRA base weights) are cast to."""
    return _MIXED_DTYPES.get(str(precision), torch.float32)


def check_optimizer(name: str, accelerator: str) -> None:
    """A clear error, before anything trains, for an optimizer this machine cannot run."""
    if name != "adamw_8bit":
        return
    if str(accelerator) == "cpu" or not torch.cuda.is_available():
        where = "trainer.accelerator=cpu" if str(accelerator) == "cpu" else "no CUDA device is visible"
        raise ConfigError(
            f"train.optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU kernels here) but {where}; "
            "use train.optimizer=adamw on the CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'bitsandbytes>=0.43' (or use train.optimizer=adamw)") from exc


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _cast_frozen(module: torch.nn.Module | None, dtype: torch.dtype) -> None:
    """Store ``module``'s frozen weights in ``dtype`` and keep its trainable ones in float32.

    Trainable weights in half precision make the 16-mixed grad scaler fail ("Attempting to
    unscale FP16 gradients") and lose small updates, so they stay float32 master weights.
    """
    if module is None or dtype == torch.float32:
        return
    params = list(module.parameters())
    if params and all(p.requires_grad for p in params):
        return  # fully trained: Lightning's mixed precision keeps it float32
    from diffusers.training_utils import cast_training_params

    module.to(dtype)
    cast_training_params(module, dtype=torch.float32)


class LatentDiffusionModule(pl.LightningModule):
    """UNet2DConditionModel + CLIP text encoder (+ frozen AutoencoderKL) + DDPM training.

    Noise, timesteps and caption dropout come from a generator seeded by
    (seed, global step, micro-batch), so a resumed run draws exactly what an uninterrupted
    run would: resume equivalence does not depend on restoring global RNG state.
    Memorization tooling gets the model through :meth:`diffusion_model` (EMA weights by
    default), never by reaching into attributes.

    With ``model.lora.enabled`` the UNet (and optionally the text encoder) carry peft LoRA
    adapters on frozen base weights: only the adapters train, the EMA averages only them, and
    checkpoints of a ``model.pretrained`` run hold only trained weights (the base is reloaded
    from ``model.pretrained`` on resume). With a :class:`~eidetic.latent_cache.LatentCache`
    (``latent_cache``) the VAE is not run during training.

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
        lora = cfg.model.lora
        self.lora = bool(lora.enabled)
        self.lora_parameter_count = 0
        if self.lora:
            from eidetic.lora import add_lora

            self.lora_parameter_count += add_lora(unet, lora.target_modules, lora.rank, lora.alpha, lora.dropout)
            if lora.text_encoder:
                self.lora_parameter_count += add_lora(text.text_encoder, lora.text_target_modules, lora.rank, lora.alpha, lora.dropout,
                                                      setting="model.lora.text_target_modules")
        self.train_text = (bool(cfg.model.text.train) and not cfg.model.pretrained) or (self.lora and bool(lora.text_encoder))
        if not self.train_text:
            self.text.text_encoder.requires_grad_(False)
        dtype = weight_dtype(cfg.train.precision)
        for module in (unet, text.text_encoder, vae):
            _cast_frozen(module, dtype)
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.train_text:
                # non-reentrant: the frozen embeddings under text-encoder adapters give the checkpointed inputs no grad
                text.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ema = cfg.train.ema
        self.ema_unet = EMA(unet, ema.decay, ema.warmup) if ema.enabled else None
        self.ema_text = EMA(text.text_encoder, ema.decay, ema.warmup) if ema.enabled and self.train_text else None
        if cfg.train.compile:
            unet.compile()  # in place, so parameter names (checkpoints, EMA, adapters) stay the same
        # a pretrained run's checkpoints hold only what trains; the rest comes from model.pretrained
        self.strict_loading = not cfg.model.pretrained
        self.latent_cache = None  # an eidetic.latent_cache.LatentCache, prepared at fit start
        self.batch_transforms: list = []
        self.embedding_transforms: list = []
        self.sample_filters: list = []
        self.loss_hooks: list = []
        # from_pretrained hands modules back in eval mode: what is trained must train (dropout on)
        self.train()

    # ---- model access ------------------------------------------------------------------
    def diffusion_model(self, ema: bool = True, mitigated: bool = True) -> DiffusionModel:
        """The model as every memorization algorithm sees it (EMA weights by default), with the
        ``inference_mitigation`` section applied (``mitigated=False``: the model as it is)."""
        unet = self.ema_unet.shadow if (ema and self.ema_unet is not None) else self.unet
        encoder = self.ema_text.shadow if (ema and self.ema_text is not None) else self.text.text_encoder
        model = DiffusionModel(unet=unet, scheduler=self.scheduler, encode_prompt=lambda captions: self.text(captions, encoder=encoder), vae=self.vae)
        # query-time mitigations apply to every evaluation that samples through this model
        if not mitigated:
            return model
        return mitigate(model, InferenceMitigation.from_settings(self.cfg.inference_mitigation), tokenizer=self.text.tokenizer)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer holds: the UNet's (and a trained text encoder's) parameters that
        require grad: under LoRA, only the adapters."""
        modules = [self.unet] + ([self.text.text_encoder] if self.train_text else [])
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def cached_latents(self, rows) -> torch.Tensor | None:
        """Scaled posterior means of canvas ``rows`` from the latent cache (None without one)."""
        if self.latent_cache is None or not self.latent_cache.ready:
            return None
        return self.latent_cache.means(torch.as_tensor(rows))

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

        if self.latent_cache is not None and not self.latent_cache.ready:
            self.latent_cache.prepare(self.vae, write=self.trainer.is_global_zero)
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
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        return (dist.mean + dist.std * eps) * self.vae.config.scaling_factor

    def training_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The batch's x0: drawn from the latent cache when there is one (same noise draw), else encoded now."""
        if self.latent_cache is not None:
            x0 = self.latent_cache.sample(batch["index"], batch.get("flipped"), generator)
            return x0.to(self.device, self.vae.dtype)
        return self.encode_batch(batch["pixel_values"], generator)

    def training_step(self, batch, batch_idx):
        cfg = self.cfg.train
        g = self._generator(batch_idx)
        for transform in self.batch_transforms:
            batch = transform(self, batch, batch_idx)
        x0 = self.training_latents(batch, g)
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
        optimizer = make_optimizer(cfg.optimizer, self.trainable_parameters(), cfg.lr, cfg.weight_decay)
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

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint_keys(self) -> set[str]:
        """State-dict keys a pretrained run's checkpoint keeps: trained parameters, their EMA
        averages and the EMA counters (everything else is reloaded from model.pretrained)."""
        keep = set()
        for prefix, module in (("unet.", self.unet), ("text.text_encoder.", self.text.text_encoder)):
            keep |= {prefix + n for n, p in module.named_parameters() if p.requires_grad}
        for prefix, ema in (("ema_unet.", self.ema_unet), ("ema_text.", self.ema_text)):
            if ema is not None:
                keep |= {f"{prefix}shadow.{n}" for n in ema.averaged_names()} | {f"{prefix}num_updates"}
        return keep

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.cfg.model.pretrained:
            keep = self.checkpoint_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.cfg.model.pretrained:
            missing = sorted(self.checkpoint_keys() - set(checkpoint["state_dict"]))
            if missing:
                raise ConfigError(
                    f"the checkpoint lacks {len(missing)} trained weight(s) of this model (e.g. {missing[0]}): it was written "
                    "by a run with other model.lora / model.pretrained settings; resume with the run's own config"
                )

    # ---- export ------------------------------------------------------------------------
    def _export_modules(self, ema: bool):
        unet = self.ema_unet.shadow if (ema and self.ema_unet is not None) else self.unet
        encoder = self.ema_text.shadow if (ema and self.ema_text is not None) else self.text.text_encoder
        return unet, encoder

    def export_pipeline(self, directory: str | Path, ema: bool = True) -> Path:
        from eidetic.pipelines import save_pipeline

        unet, encoder = self._export_modules(ema)
        return save_pipeline(directory, unet=unet, text_encoder=encoder, tokenizer=self.text.tokenizer, scheduler=self.scheduler, vae=self.vae)

    def export_lora(self, directory: str | Path, ema: bool = True) -> Path:
        """The adapters (EMA averages by default) where ``StableDiffusionPipeline.load_lora_weights`` finds them."""
        from eidetic.lora import save_lora

        unet, encoder = self._export_modules(ema)
        return save_lora(directory, unet, encoder if self.cfg.model.lora.text_encoder else None)
