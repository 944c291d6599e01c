"""The training workflow: build everything a training config describes and fit it.

Order matters for crash safety. Everything a command reads is checked before anything is
written (:func:`read_inputs`): the config, the run directory (a run is never silently reused:
:func:`check_run_dir`), the data, the model directory and, on resume, the checkpoint against
the config (:func:`check_checkpoint`); a command that fails there leaves the run directory
byte for byte as it was. Then the resolved config and the key map are written before any
training, so even a run that dies in its first step can be audited and resumed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from eidetic.config import load
from eidetic.errors import ConfigError
from eidetic.schema.train import TrainConfig

from .rundir import RunDirectory, environment, global_rank

__all__ = ["Schema", "load_config", "resolve_run_dir", "check_run_dir", "Inputs", "read_inputs", "check_checkpoint", "build", "train_autoencoder", "fit",
           "run", "evaluate", "done_message", "console_summary"]

log = logging.getLogger("eidetic")
Schema = TrainConfig

# Lightning's DDP launcher re-runs this script in worker processes; they learn rank 0's run
# directory from this variable, which is set only while ``fit`` launches them.
_LAUNCH_RUN_DIR = "EIDETIC_LAUNCH_RUN_DIR"


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """The training config of a command line. Resuming (``run.dir=RUN train.resume=...``
    without ``--config``) starts from the run's own ``config.yaml``."""
    from eidetic.config import parse_overrides

    overrides = agent_overrides(list(overrides)) if os.environ.get("WANDB_SWEEP_ID") else list(overrides)
    cli = parse_overrides(overrides)
    run_dir, resume = OmegaConf.select(cli, "run.dir"), OmegaConf.select(cli, "train.resume")
    base = None
    saved = Path(run_dir) / "config.yaml" if run_dir else None
    if resume and saved is not None and saved.is_file() and not files:
        base = OmegaConf.load(saved)
    return load(Schema, files, overrides, base=base, base_source=f"the run's saved config {saved}")


def agent_overrides(overrides: list[str]) -> list[str]:
    """Launched by ``wandb agent``: log into the run the agent created (its id, online)."""
    given = {o.split("=", 1)[0] for o in overrides}
    extra = []
    if os.environ.get("WANDB_RUN_ID") and "logging.wandb.id" not in given:
        extra.append(f"logging.wandb.id={os.environ['WANDB_RUN_ID']}")
    if "logging.wandb.mode" not in given:
        extra.append("logging.wandb.mode=online")
    return [*extra, *overrides]


def resolve_run_dir(cfg: DictConfig) -> RunDirectory:
    """The run's directory (``run.dir``, or a new timestamped one); sets ``cfg.run.dir``."""
    if cfg.run.dir:
        path = Path(cfg.run.dir)
    elif os.environ.get(_LAUNCH_RUN_DIR):
        path = Path(os.environ[_LAUNCH_RUN_DIR])
    else:
        path = RunDirectory.default_path(cfg.run.name)
    run_dir = RunDirectory(path)
    if run_dir.path.exists() and not run_dir.path.is_dir():
        raise ConfigError(f"run.dir={run_dir.path} is a file, not a directory: point run.dir at a directory (new or a run's)")
    if cfg.train.resume and not run_dir.path.is_dir():
        raise ConfigError(f"train.resume={cfg.train.resume!r} needs run.dir pointing at an existing run; {run_dir.path} does not exist")
    if cfg.train.resume == "last" and not run_dir.holds_run():
        raise ConfigError(f"train.resume=last: {run_dir.path} holds no run to resume (no config.yaml or checkpoints): "
                          "start a run there without train.resume")
    cfg.run.dir = str(run_dir.path)
    if not cfg.logging.wandb.id:
        cfg.logging.wandb.id = uuid.uuid4().hex[:12]
    return run_dir


def check_run_dir(cfg: DictConfig, run_dir: RunDirectory) -> None:
    """A command without ``train.resume`` does not write into a directory that already holds a
    run: it would mix two runs' files. ``run.overwrite=true`` says to move the old one aside."""
    if not run_dir.writer or cfg.train.resume or cfg.run.overwrite or not run_dir.holds_run():
        return
    found = [name for name in run_dir.RUN_FILES if (run_dir.path / name).exists()]
    raise ConfigError(
        f"run.dir={run_dir.path} already holds a run ({', '.join(found)}). To continue it: run.dir={run_dir.path} "
        f"train.resume=last. To start a fresh run there: run.overwrite=true (the old run is moved aside to "
        f"{run_dir.path.name}.old-<date>-<time> next to it, not deleted). Or choose another run.dir"
    )


def resume_checkpoint(cfg: DictConfig, run_dir: RunDirectory) -> Path | None:
    """The checkpoint ``train.resume`` names, checked to exist; None: train from the start.

    ``last`` is the run's ``checkpoints/last.ckpt``, or, when a kill came between the two
    renames of a checkpoint, its newest ``step-*.ckpt``; a run killed before its first
    checkpoint has none and starts again from step 0 (with its own config and W&B id).
    """
    if not cfg.train.resume:
        return None
    folder = run_dir / "checkpoints"
    if cfg.train.resume == "last":
        candidates = [folder / "last.ckpt"] + sorted(folder.glob("step-*.ckpt"), reverse=True)
        return next((p for p in candidates if p.is_file()), None)
    path = Path(cfg.train.resume)
    if not path.is_file():
        others = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        hint = f" (this run has {', '.join(others)}: train.resume=last or train.resume=PATH picks one)" if others else ""
        raise ConfigError(f"train.resume: checkpoint not found: {path}{hint}")
    return path


@contextmanager
def _launch_env(run_dir: RunDirectory):
    previous = os.environ.get(_LAUNCH_RUN_DIR)
    os.environ[_LAUNCH_RUN_DIR] = str(run_dir.path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_LAUNCH_RUN_DIR, None)
        else:
            os.environ[_LAUNCH_RUN_DIR] = previous


# ---- building ---------------------------------------------------------------------------------
def train_autoencoder(cfg: DictConfig, dm, directory: str | Path):
    """Train (or reuse from an earlier attempt) the frozen AutoencoderKL in ``directory/autoencoder``."""
    from eidetic.io import atomic_directory
    from eidetic.pipelines import load_vae
    from lightning_modules.autoencoder import AutoencoderModule, fit_latent_scale
    from lightning_modules.models import build_vae

    vae_dir = Path(directory) / "autoencoder"
    if (vae_dir / "config.json").exists():
        return load_vae(vae_dir)
    vae = build_vae(cfg.model.vae, dm.canvas_size)
    module = AutoencoderModule(vae, cfg.model.vae.lr, cfg.model.vae.kl_weight)
    trainer = pl.Trainer(
        max_steps=cfg.model.vae.train_steps, accelerator=cfg.trainer.accelerator, devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=cfg.trainer.enable_progress_bar, enable_model_summary=False,
        callbacks=_progress_bar(cfg, "autoencoder"),
    )
    log.info("autoencoder stage: %d steps", cfg.model.vae.train_steps)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    vae = module.vae.cpu().eval()
    loader = dm.train_dataloader()
    scale = fit_latent_scale(vae, [b for _, b in zip(range(8), loader)])
    vae.register_to_config(scaling_factor=scale)
    if global_rank() == 0:
        with atomic_directory(vae_dir) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
    return vae


def _check_geometry(cfg: DictConfig, dm) -> None:
    if cfg.model.space == "latent" and dm.canvas_size % 8:
        raise ConfigError(
            f"the canvas is {dm.canvas_size}px (data.resolution + 2 * data.border); latent models export as a "
            "StableDiffusionPipeline, which needs sizes divisible by 8: change data.resolution or data.border"
        )


@dataclass
class Inputs:
    """What a run reads before it writes anything: the data module and a loaded model directory."""

    dm: object  # lightning_modules.data.SolidMarkDataModule
    parts: object = None  # eidetic.pipelines.PipelineComponents of model.pretrained
    vae: object = None  # the AutoencoderKL of model.vae.pretrained


def read_inputs(cfg: DictConfig, dm=None) -> Inputs:
    """Read and check the data and the model directories of ``cfg``; writes nothing.

    Every problem of a data folder is reported in one error; a model directory that cannot be
    loaded is a :class:`~eidetic.errors.ModelLoadError`.
    """
    from eidetic.pipelines import load_components, load_vae
    from lightning_modules.data import SolidMarkDataModule
    from lightning_modules.diffusion import check_optimizer

    check_optimizer(cfg.train.optimizer, cfg.trainer.accelerator)
    pl.seed_everything(cfg.seed, workers=True)
    dm = dm if dm is not None else SolidMarkDataModule(cfg.data, seed=cfg.seed, mitigation=cfg.mitigation)
    _check_geometry(cfg, dm)
    inputs = Inputs(dm)
    if cfg.model.pretrained:
        inputs.parts = parts = load_components(cfg.model.pretrained)
        expected = dm.canvas_size // parts.downsample
        if parts.unet.config.sample_size != expected:
            raise ConfigError(
                f"model.pretrained={cfg.model.pretrained} works on {parts.unet.config.sample_size}px inputs, but the data gives "
                f"{dm.canvas_size}px canvases ({expected}px for its UNet); set data.resolution/data.border to match"
            )
        if cfg.data.cache_latents and parts.vae is None:
            raise ConfigError(
                f"data.cache_latents=true, but model.pretrained={cfg.model.pretrained} is a pixel-space model (no vae/): "
                "there are no latents to cache; set data.cache_latents=false"
            )
    elif cfg.model.space == "latent" and cfg.model.vae.pretrained:
        inputs.vae = load_vae(cfg.model.vae.pretrained)
    return inputs


def _diffusion_module(cfg: DictConfig, run_dir: RunDirectory, inputs: Inputs, vae, tokenizer_dir: Path):
    """The diffusion module of ``cfg`` over the inputs (a freshly built model, or model.pretrained's)."""
    from lightning_modules.diffusion import LatentDiffusionModule
    from lightning_modules.models import build_scheduler, build_text_stack, build_unet

    dm, parts = inputs.dm, inputs.parts
    if parts is not None:
        unet, text, scheduler, vae = parts.unet, parts.text, parts.scheduler, parts.vae
    else:
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        channels = vae.config.latent_channels if vae is not None else 3
        text = build_text_stack(dm.captions, cfg.model.text, tokenizer_dir)
        unet = build_unet(cfg.model.unet, dm.canvas_size // factor, channels, text.hidden_size)
        scheduler = build_scheduler(cfg.model.scheduler, cfg.model.prediction_type, cfg.model.space == "latent")
    return LatentDiffusionModule(cfg, unet, text, scheduler, vae=vae, run_dir=run_dir.path)


def _meta_copy(module):
    """An uninitialised copy (on the meta device) of a diffusers or transformers model: its shapes only."""
    import torch

    with torch.device("meta"):
        return module.from_config(module.config) if hasattr(module, "from_config") else type(module)(module.config)


def expected_shapes(cfg: DictConfig, run_dir: RunDirectory, inputs: Inputs) -> dict[str, tuple]:
    """State-dict key -> shape of what ``cfg`` trains (what its checkpoints hold), from a model
    built on the meta device: no memory, no random numbers drawn, nothing written."""
    from copy import copy

    import torch

    from eidetic.pipelines import PipelineComponents, TextStack
    from lightning_modules.models import build_vae

    with tempfile.TemporaryDirectory() as tmp:
        parts = inputs.parts
        if parts is not None:
            parts = PipelineComponents(unet=_meta_copy(parts.unet), text=TextStack(parts.tokenizer, _meta_copy(parts.text_encoder)),
                                       scheduler=parts.scheduler, vae=_meta_copy(parts.vae) if parts.vae is not None else None)
        vae = None
        if parts is None and cfg.model.space == "latent":
            from diffusers import AutoencoderKL

            trained = run_dir / "autoencoder"
            if inputs.vae is not None:
                vae = _meta_copy(inputs.vae)
            elif (trained / "config.json").is_file():
                with torch.device("meta"):
                    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(trained))
            else:
                with torch.device("meta"):
                    vae = build_vae(cfg.model.vae, inputs.dm.canvas_size)
        meta_inputs = copy(inputs)
        meta_inputs.parts = parts
        with torch.device("meta"):
            module = _diffusion_module(cfg, run_dir, meta_inputs, vae, Path(tmp) / "tokenizer")
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if cfg.model.pretrained:
            keep = module.checkpoint_keys()
            shapes = {k: v for k, v in shapes.items() if k in keep}
    return shapes


def check_checkpoint(cfg: DictConfig, run_dir: RunDirectory, inputs: Inputs) -> None:
    """On resume: the checkpoint must hold exactly the weights, of the shapes, that ``cfg``
    trains; else an error naming a few mismatching keys, their count, and the settings changed."""
    import torch

    from callbacks.checkpoint import checkpoint_mismatch

    path = resume_checkpoint(cfg, run_dir)
    if path is None:
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception as exc:  # a torn or foreign file: say so instead of a traceback
        raise ConfigError(f"train.resume: cannot read the checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "resume from another one with train.resume=PATH (the run's checkpoints/step-*.ckpt)") from exc
    with torch.random.fork_rng(devices=[]):
        expected = expected_shapes(cfg, run_dir, inputs)
    problem = checkpoint_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        changed = changed_settings(cfg, run_dir / "config.yaml")
        how = (f" This command changes {'; '.join(changed)} from the run's config.yaml: drop those overrides to resume it"
               if changed else " Resume with the settings the run was trained with (its config.yaml)")
        raise ConfigError(
            f"the checkpoint {path} does not fit this config: {problem}.{how}, or train the new model in a new run.dir "
            "(or here with run.overwrite=true, which moves the old run aside)"
        )


def changed_settings(cfg: DictConfig, saved: Path, sections: tuple[str, ...] = ("model.", "data."), ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every setting of ``cfg`` under ``sections`` (``("",)``: all) that
    differs from the run's saved config, except the keys in ``ignore``."""
    if not saved.is_file():
        return []
    old, new = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=True)), _flat(OmegaConf.to_container(cfg, resolve=True))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k.startswith(sections) and k not in ignore and old.get(k) != new.get(k)]


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def build(cfg: DictConfig, run_dir: RunDirectory, dm=None, inputs: Inputs | None = None):
    """(data module, diffusion module) for ``cfg``; writes the key map, tokenizer and autoencoder."""

    inputs = inputs if inputs is not None else read_inputs(cfg, dm)
    dm = inputs.dm
    if run_dir.writer:
        dm.write_keymap(run_dir.path)
    vae = None
    if inputs.parts is None and cfg.model.space == "latent":
        vae = inputs.vae if inputs.vae is not None else train_autoencoder(cfg, dm, run_dir.path)
    # the model starts from the seed whether the autoencoder was trained just now (drawing random
    # numbers) or reused from an earlier attempt of this run
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = _diffusion_module(cfg, run_dir, inputs, vae, run_dir.path / "tokenizer")
    if cfg.data.cache_latents:
        from eidetic.latent_cache import LatentCache

        ids = [r.id for r in dm.records]  # cache row i is record i: batches carry record indices
        module.latent_cache = LatentCache(run_dir.path / "latent_cache", lambda: dm.canvases(ids), flips=cfg.mitigation.augment.flip > 0)
    return dm, module


def _progress_bar(cfg: DictConfig, label: str) -> list[pl.Callback]:
    from callbacks.progress import StepProgressBar

    return [StepProgressBar(label)] if cfg.trainer.enable_progress_bar else []


def log_interval(cfg: DictConfig, dm) -> int:
    """``trainer.log_every_n_steps``, clamped to the batches of one epoch of one process: a
    longer interval would skip whole epochs of a small data set (and Lightning warns of it)."""
    processes = max(1, int(cfg.trainer.devices) * int(cfg.trainer.num_nodes))
    batches = max(1, len(dm.train_index()) // (int(cfg.data.batch_size) * processes))
    return max(1, min(int(cfg.trainer.log_every_n_steps), batches))


def _callbacks(cfg: DictConfig, dm, run_dir: RunDirectory, extra: Sequence[pl.Callback]) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from callbacks import build_callbacks
    from callbacks.checkpoint import StepCheckpoint

    ck = cfg.train.checkpoint
    checkpoint = StepCheckpoint(
        dirpath=str(run_dir / "checkpoints"), filename="step-{step:06d}", every_n_train_steps=ck.every_n_steps or None,
        save_top_k=ck.keep, monitor="step", mode="max", save_last=True, auto_insert_metric_name=False,
    )
    monitors = [LearningRateMonitor(logging_interval="step")] if (cfg.logging.csv or cfg.logging.wandb.enabled) else []
    return [checkpoint, *monitors, *_progress_bar(cfg, "training"), *build_callbacks(cfg, dm, run_dir.path, extra=extra)]


def trainer_for(cfg: DictConfig, dm, run_dir: RunDirectory, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """The Lightning Trainer of a run: the ``trainer`` section as it is, plus what ``train`` sets."""
    from callbacks.checkpoint import AtomicCheckpointIO

    # every rank gets the loggers (they write on rank 0 only; Lightning expects them everywhere)
    loggers = run_dir.loggers(cfg.logging, cfg.run.name, config=OmegaConf.to_container(cfg, resolve=True))
    settings = OmegaConf.to_container(cfg.trainer)
    settings["log_every_n_steps"] = log_interval(cfg, dm)
    return pl.Trainer(
        **settings,
        max_steps=cfg.train.max_steps,
        max_epochs=cfg.train.max_epochs if cfg.train.max_epochs is not None else -1,
        precision=cfg.train.precision,
        accumulate_grad_batches=cfg.train.grad_accum,
        gradient_clip_val=cfg.train.grad_clip or None,
        logger=loggers,
        callbacks=_callbacks(cfg, dm, run_dir, callbacks),
        default_root_dir=str(run_dir.path),
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )


def fit(cfg: DictConfig, dm, module, run_dir: RunDirectory, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    trainer = trainer_for(cfg, dm, run_dir, callbacks)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    started = time.perf_counter()
    with _launch_env(run_dir):
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    if trainer.is_global_zero and not cfg.trainer.fast_dev_run:
        _finish(trainer, module, dm, run_dir, time.perf_counter() - started)
    return trainer


def _finish(trainer, module, dm, run_dir: RunDirectory, elapsed: float) -> None:
    import torch

    cfg = module.cfg
    if module.lora:
        from eidetic.lora import merge_lora

        # the adapters alone are the fine-tune; a merged copy of the whole model only on request
        module.export_lora(run_dir / "lora")
        if cfg.model.lora.export_merged:
            merge_lora(cfg.model.pretrained, run_dir / "lora", run_dir / "model")
        run_dir.update_summary("lora", {"parameters": module.lora_parameter_count, "rank": cfg.model.lora.rank,
                                        "alpha": cfg.model.lora.alpha, "text_encoder": bool(cfg.model.lora.text_encoder),
                                        "base": cfg.model.pretrained, "merged_export": bool(cfg.model.lora.export_merged)})
    else:
        module.export_pipeline(run_dir / "model")
    if module.latent_cache is not None and module.latent_cache.ready:
        run_dir.update_summary("latent_cache", {"path": str(module.latent_cache.path), "built_this_run": module.latent_cache.built,
                                                "views": int(module.latent_cache.mean.shape[1])})
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    run_dir.update_summary(
        "train",
        {
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "final_loss": metrics.get("train/loss"),
            "wall_time_s": round(elapsed, 2),
            "train_images": len(dm.train_index()),
        },
    )


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> Path:
    """Train one run; returns its directory.

    ``callbacks`` join the config's own after its monitors and before the memorization
    controls, so a control acts on what an extra monitor published in the same step.
    """
    run_dir = resolve_run_dir(cfg)
    check_run_dir(cfg, run_dir)
    inputs = read_inputs(cfg)
    check_checkpoint(cfg, run_dir, inputs)
    if cfg.train.resume and resume_checkpoint(cfg, run_dir) is None:
        log.warning("train.resume=last: %s has no checkpoint yet (it stopped before its first one); it trains again from step 0", run_dir.path)
    # everything is checked: from here on the run directory is written
    if run_dir.writer and cfg.run.overwrite and not cfg.train.resume and run_dir.holds_run():
        log.warning("run.overwrite=true: the run that was in %s is now in %s", run_dir.path, run_dir.move_aside())
    run_dir.create()
    run_dir.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    run_dir.write_json("environment.json", environment(cfg.trainer.accelerator))
    with run_dir:
        try:
            dm, module = build(cfg, run_dir, inputs=inputs)
            fit(cfg, dm, module, run_dir, callbacks)
        finally:  # a crashed run gets a report too: whatever it wrote before it failed
            if cfg.run.report and run_dir.writer:
                from .report import write_report_safely

                write_report_safely(run_dir.path)
    return run_dir.path


class _EvaluationTrainer:
    """What the monitors read from a Lightning trainer, for evaluating a finished model in one
    process without training it (no loggers: the results go to the run directory)."""

    global_rank, world_size, is_global_zero = 0, 1, True

    class strategy:  # noqa: N801 - stands in for the trainer's strategy
        @staticmethod
        def reduce(value, reduce_op="sum"):
            return value

    def __init__(self, datamodule, module, global_step: int, epoch: int):
        self.datamodule, self.lightning_module = datamodule, module
        self.global_step, self.current_epoch = int(global_step), int(epoch)
        self.loggers: list = []


def evaluate(cfg: DictConfig, checkpoint: str | Path) -> Path:
    """Score the trained weights in ``checkpoint`` with ``cfg``'s monitors (SolidMark, extraction
    probes) into ``cfg.run.dir``, training nothing: how an inference-time setting (its
    ``inference_mitigation`` section) is evaluated on another run's model."""
    import torch

    run_dir = resolve_run_dir(cfg)
    run_dir.create()
    run_dir.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    with run_dir:
        dm, module = build(cfg, run_dir)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"], strict=module.strict_loading)
        module.eval()
        trainer = _EvaluationTrainer(dm, module, state.get("global_step", 0), state.get("epoch", 0))
        if cfg.solidmark.enabled:
            from callbacks.solidmark import SolidMarkCallback

            SolidMarkCallback(cfg.solidmark).evaluate(trainer, module)
        if cfg.extraction.enabled:
            from callbacks.extraction import ExtractionProbeCallback

            ExtractionProbeCallback(cfg.extraction, border=cfg.data.border).probe(trainer, module)
        run_dir.update_summary("evaluated", {"checkpoint": str(checkpoint), "global_step": trainer.global_step})
    return run_dir.path


def done_message(path: Path) -> str:
    return f"run directory: {path}"


def console_summary(path: Path):
    from .report import console_summary as summary

    return summary(path)
