"""Lightning callbacks: each schedules an eidetic algorithm, feeds it and logs it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .samples import SampleGridCallback, save_grid

__all__ = ["SampleGridCallback", "save_grid", "build_callbacks"]


def build_callbacks(cfg: DictConfig, dm, run_dir: Path) -> list:
    """The callbacks a config asks for, in the order they should run."""
    callbacks = []
    v = cfg.validation
    if v.every_n_steps or v.captions:
        captions = list(v.captions) or [r.caption for r in dm.records if r.split == "train"][:4]
        callbacks.append(SampleGridCallback(captions, v.every_n_steps, v.steps, v.guidance, v.sampler, cfg.seed, dm.canvas_size))
    if cfg.solidmark.enabled:
        from .solidmark import SolidMarkCallback

        callbacks.append(SolidMarkCallback.from_config(cfg))
    if cfg.extraction.enabled:
        from .extraction import ExtractionProbeCallback

        callbacks.append(ExtractionProbeCallback())
    if cfg.realism.enabled:
        from .realism import RealismCallback

        callbacks.append(RealismCallback.from_config(cfg, dm))
    from .controls import MemorizationControlCallback, MitigationCallback

    if MitigationCallback.active(cfg):
        callbacks.append(MitigationCallback(cfg.mitigation, dm.captions, dm.near_dedup_removed))
    if cfg.controls.enabled:  # last: acts on what the monitors above computed this step
        callbacks.append(MemorizationControlCallback(cfg.controls))
    return callbacks
