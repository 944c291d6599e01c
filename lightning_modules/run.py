"""Build everything a config describes and fit it: the body of ``train.py``.

Order matters for crash safety: the run directory, resolved config and key map are written
before any training, so even a run that dies in its first step can be audited and resumed.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import datetime
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from eidetic.config import ConfigError
from eidetic.io import update_summary, write_text_atomic

from .autoencoder import AutoencoderModule, fit_latent_scale
from .data import SolidMarkDataModule
from .diffusion import LatentDiffusionModule
from .models import build_scheduler, build_text_stack, build_unet, build_vae, load_pretrained, load_vae

__all__ = ["prepare_run_dir", "build", "fit", "run"]

log = logging.getLogger("eidetic")
RUN_DIR_ENV = "EIDETIC_RUN_DIR"  # lets DDP worker processes find rank 0's run directory


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def prepare_run_dir(cfg: DictConfig) -> Path:
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
    elif os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    else:
        run_dir = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.run.name}"
    run_dir = run_dir.resolve()
    if cfg.train.resume and not run_dir.is_dir():
        raise ConfigError(f"train.resume={cfg.train.resume!r} needs run.dir pointing at an existing run; {run_dir} does not exist")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    cfg.run.dir = str(run_dir)
    if not cfg.logging.wandb.id:
        cfg.logging.wandb.id = uuid.uuid4().hex[:12]
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def _train_autoencoder(cfg: DictConfig, dm: SolidMarkDataModule, run_dir: Path):
    """Train (or reuse from an earlier attempt of this run) the frozen AutoencoderKL."""
    vae_dir = run_dir / "autoencoder"
    if (vae_dir / "config.json").exists():
        return load_vae(vae_dir)
    vae = build_vae(cfg.model.vae, dm.canvas_size)
    module = AutoencoderModule(vae, cfg.model.vae.lr, cfg.model.vae.kl_weight)
    trainer = pl.Trainer(
        max_steps=cfg.model.vae.train_steps,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
    )
    log.info("autoencoder stage: %d steps", cfg.model.vae.train_steps)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    vae = module.vae.cpu().eval()
    loader = dm.train_dataloader()
    scale = fit_latent_scale(vae, [b for _, b in zip(range(8), loader)])
    vae.register_to_config(scaling_factor=scale)
    if _rank() == 0:
        vae.save_pretrained(vae_dir, safe_serialization=True)
    return vae


def build(cfg: DictConfig, run_dir: Path) -> tuple[SolidMarkDataModule, LatentDiffusionModule]:
    pl.seed_everything(cfg.seed, workers=True)
    dm = SolidMarkDataModule(cfg.data, seed=cfg.seed, mitigation=cfg.get("mitigation"))
    if _rank() == 0:
        dm.write_keymap(run_dir)
    latent = cfg.model.space == "latent"
    if cfg.model.space not in ("latent", "pixel"):
        raise ConfigError(f"model.space must be 'latent' or 'pixel', got {cfg.model.space!r}")
    if latent and dm.canvas_size % 8:
        raise ConfigError(
            f"the canvas is {dm.canvas_size}px (data.resolution + 2 * data.border); latent models export as a "
            "StableDiffusionPipeline, which needs sizes divisible by 8: change data.resolution or data.border"
        )
    if cfg.model.pretrained:
        parts = load_pretrained(cfg.model.pretrained)
        unet, text, scheduler, vae = parts.unet, parts.text, parts.scheduler, parts.vae
        expected = dm.canvas_size // (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
        if unet.config.sample_size != expected:
            raise ConfigError(
                f"model.pretrained={cfg.model.pretrained} works on {unet.config.sample_size}px inputs, but the data gives "
                f"{dm.canvas_size}px canvases ({expected}px for its UNet); set data.resolution/data.border to match"
            )
    else:
        vae = None
        if latent:
            vae = load_vae(cfg.model.vae.pretrained) if cfg.model.vae.pretrained else _train_autoencoder(cfg, dm, run_dir)
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        channels = vae.config.latent_channels if vae is not None else 3
        text = build_text_stack(dm.captions, cfg.model.text, run_dir / "tokenizer")
        unet = build_unet(cfg.model.unet, dm.canvas_size // factor, channels, text.hidden_size)
        scheduler = build_scheduler(cfg.model.scheduler, cfg.model.prediction_type, latent)
    module = LatentDiffusionModule(cfg, unet, text, scheduler, vae=vae, run_dir=run_dir)
    return dm, module


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import WandbLogger

    from .csv_logger import RunCSVLogger

    loggers = []
    if cfg.logging.csv:
        loggers.append(RunCSVLogger(run_dir / "metrics.csv"))
    w = cfg.logging.wandb
    if w.enabled and w.mode != "disabled":
        os.environ.setdefault("WANDB_MODE", w.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                project=w.project,
                name=cfg.run.name,
                save_dir=str(run_dir),
                id=w.id,
                resume="allow",
                group=w.group,
                offline=w.mode == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def _callbacks(cfg: DictConfig, dm: SolidMarkDataModule, run_dir: Path) -> list:
    from callbacks import build_callbacks
    from callbacks.checkpoint import StepCheckpoint

    ck = cfg.train.checkpoint
    checkpoint = StepCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step-{step:06d}",
        every_n_train_steps=ck.every_n_steps or None,
        save_top_k=ck.keep,
        monitor="step",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    from lightning.pytorch.callbacks import LearningRateMonitor

    monitors = [LearningRateMonitor(logging_interval="step")] if (cfg.logging.csv or cfg.logging.wandb.enabled) else []
    return [checkpoint, *monitors, *build_callbacks(cfg, dm, run_dir)]


def fit(cfg: DictConfig, dm: SolidMarkDataModule, module: LatentDiffusionModule, run_dir: Path, callbacks=()) -> pl.Trainer:
    t = cfg.trainer
    trainer = pl.Trainer(
        max_steps=cfg.train.max_steps,
        max_epochs=cfg.train.max_epochs if cfg.train.max_epochs is not None else -1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=cfg.train.precision,
        accumulate_grad_batches=cfg.train.grad_accum,
        gradient_clip_val=cfg.train.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        fast_dev_run=t.fast_dev_run,
        enable_progress_bar=t.enable_progress_bar,
        limit_val_batches=t.limit_val_batches,
        logger=_loggers(cfg, run_dir),
        callbacks=[*_callbacks(cfg, dm, run_dir), *callbacks],
        default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    ckpt_path = None
    if cfg.train.resume:
        ckpt_path = run_dir / "checkpoints" / "last.ckpt" if cfg.train.resume == "last" else Path(cfg.train.resume)
        if not ckpt_path.exists():
            raise ConfigError(f"train.resume: checkpoint not found: {ckpt_path}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    elapsed = time.perf_counter() - started
    if trainer.is_global_zero and not t.fast_dev_run:
        _finish(cfg, trainer, module, run_dir, elapsed)
    return trainer


def _finish(cfg, trainer, module, run_dir: Path, elapsed: float) -> None:
    module.export_pipeline(run_dir / "model")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    update_summary(
        run_dir,
        "train",
        {
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "final_loss": metrics.get("train/loss"),
            "wall_time_s": round(elapsed, 2),
            "train_images": len(module.trainer.datamodule.train_index()),
        },
    )


def run(cfg: DictConfig, callbacks=()) -> Path:
    """Build and fit; ``callbacks`` are added to the config's own (sweeps add a trial reporter)."""
    run_dir = prepare_run_dir(cfg)
    try:
        dm, module = build(cfg, run_dir)
        fit(cfg, dm, module, run_dir, callbacks)
    finally:
        _finish_wandb(run_dir)
    return run_dir


def _finish_wandb(run_dir: Path | None = None) -> None:
    # Without this the next run in the same process (tests, sweeps) logs into this one.
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        wandb = sys.modules["wandb"]
        if run_dir is not None and _rank() == 0:
            # summary.json into the W&B run summary as summary/<section>/<key> (W&B sweeps optimise these)
            from eidetic.io import read_summary
            from eidetic.sweep import flatten_summary

            try:
                wandb.run.summary.update(flatten_summary(read_summary(run_dir)))
            except Exception as exc:  # never lose a finished run over a summary upload
                log.warning("could not copy summary.json to W&B: %s", exc)
        wandb.finish()
