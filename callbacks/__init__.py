"""Lightning callbacks: each schedules an eidetic algorithm, feeds it and logs it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from .monitor import Monitor, MonitorResult
from .samples import SampleGridCallback, save_grid

__all__ = ["SampleGridCallback", "save_grid", "build_callbacks", "Monitor", "MonitorResult"]


def build_callbacks(cfg: DictConfig, dm, run_dir: Path, extra: Sequence = ()) -> list:
    """The callbacks a config asks for, in the order they run: samples, monitors, mitigations,
    ``extra`` (a caller's own callbacks), and last the controls, which act on every monitor
    above (``extra`` monitors included) in the same step."""
    callbacks: list = []
    v = cfg.validation
    if v.every_n_steps or v.captions:
        captions = list(v.captions) or [r.caption for r in dm.records if r.split == "train"][:4]
        callbacks.append(SampleGridCallback(captions, v.every_n_steps, v.steps, v.guidance, v.sampler, cfg.seed, dm.canvas_size))
    if cfg.solidmark.enabled:
        from .solidmark import SolidMarkCallback

        callbacks.append(SolidMarkCallback(cfg.solidmark))
    if cfg.extraction.enabled:
        from .extraction import ExtractionProbeCallback

        callbacks.append(ExtractionProbeCallback(cfg.extraction, border=cfg.data.border))
    if cfg.realism.enabled:
        from .realism import RealismCallback

        callbacks.append(RealismCallback.from_config(cfg, dm))
    from .mitigation import MitigationCallback, is_active

    if is_active(cfg.mitigation):
        callbacks.append(MitigationCallback(cfg.mitigation, dm.captions, dm.near_dedup_removed))
    callbacks += list(extra)
    if cfg.controls.enabled:
        from .controls import MemorizationControlCallback

        monitors = [cb for cb in callbacks if isinstance(cb, Monitor)]
        callbacks.append(MemorizationControlCallback(cfg.controls, monitors))
    return callbacks
