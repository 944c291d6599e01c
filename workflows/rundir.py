"""The one object that owns a run directory: its files, its summary, its loggers, its W&B run.

Every workflow (training, comparison, sweep, protection, imitation) writes through a
:class:`RunDirectory`. The directory is always passed explicitly; nothing finds it through a
process-global variable. Only the writer (global rank 0) writes; other processes of a
multi-process run hold a ``RunDirectory`` too, so code does not branch on the rank itself.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from eidetic.io import read_summary, update_summary, write_json_atomic, write_text_atomic

__all__ = ["RunDirectory", "flatten_summary", "global_rank", "finish_wandb", "environment"]

log = logging.getLogger("eidetic")


def global_rank() -> int:
    """This process's rank as a launcher (Lightning, torchrun, SLURM) announces it."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name) not in (None, ""):
            return int(os.environ[name])
    return 0


def environment(accelerator: str | None = None) -> dict[str, Any]:
    """Versions and device of this process: what a report needs to say where a run ran."""
    import platform
    from importlib import metadata

    import torch

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {n: version(n) for n in ("eidetic", "torch", "lightning", "diffusers", "transformers", "torchmetrics", "wandb", "numpy")},
        "accelerator": accelerator,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "command": " ".join(sys.argv),
    }
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def flatten_summary(summary: dict, prefix: str = "summary") -> dict[str, Any]:
    """``{"train": {"final_loss": 1}}`` -> ``{"summary/train/final_loss": 1}`` (numbers and strings only)."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flatten_summary(value, name))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


def finish_wandb(summary: dict | None = None, exit_code: int | None = None) -> None:
    """Close the process's W&B run, if one is open, after copying ``summary`` into its run summary.

    Without this the next run in the same process (a comparison's next setting, a sweep's next
    trial, a test) would log into this one.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return
    if summary:
        try:
            wandb.run.summary.update(flatten_summary(summary))
        except Exception as exc:  # never lose a finished run over a summary upload
            log.warning("could not copy summary.json to W&B: %s", exc)
    try:
        wandb.finish(**({"exit_code": exit_code} if exit_code is not None else {}))
    except Exception as exc:
        log.warning("could not close the W&B run: %s", exc)


class RunDirectory:
    """A run directory: ``path``, its ``summary.json``, and the loggers that write into it."""

    def __init__(self, path: str | Path, writer: bool | None = None):
        self.path = Path(path).resolve()
        self.writer = global_rank() == 0 if writer is None else bool(writer)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @staticmethod
    def default_path(name: str, root: str | Path = "runs") -> Path:
        return Path(root) / f"{datetime.now():%Y%m%d-%H%M%S}-{name}"

    # ---- files ------------------------------------------------------------------------------
    RUN_FILES = ("config.yaml", "checkpoints", "keymap.jsonl", "metrics.csv", "summary.json")

    def holds_run(self) -> bool:
        """Whether the directory already holds a run (its config, checkpoints or results)."""
        return any((self.path / name).exists() for name in self.RUN_FILES)

    def move_aside(self) -> Path:
        """Rename the directory to ``<name>.old-<date>-<time>`` beside it (a new name each time);
        returns where it went. Nothing is deleted."""
        stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
        target, n = self.path.with_name(f"{self.path.name}.old-{stamp}"), 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
        os.rename(self.path, target)
        return target

    def create(self) -> "RunDirectory":
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_text(self, name: str, text: str) -> Path:
        if self.writer:
            write_text_atomic(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        if self.writer:
            write_json_atomic(self.path / name, data)
        return self.path / name

    # ---- summary ----------------------------------------------------------------------------
    @property
    def summary(self) -> dict:
        return read_summary(self.path)

    def update_summary(self, section: str, values: dict) -> None:
        """Replace one section of ``summary.json`` (the others are kept)."""
        if self.writer:
            update_summary(self.path, section, values)

    # ---- loggers ----------------------------------------------------------------------------
    def loggers(self, logging_cfg, name: str, config: dict | None = None, group: str | None = None,
                wandb_id: str | None = None, csv_name: str = "metrics.csv") -> list:
        """A ``metrics.csv`` logger and the W&B logger the ``logging`` section asks for."""
        from lightning.pytorch.loggers import WandbLogger

        from lightning_modules.csv_logger import RunCSVLogger

        loggers: list = []
        if logging_cfg.csv:
            loggers.append(RunCSVLogger(self.path / csv_name))
        w = logging_cfg.wandb
        if w.enabled and w.mode != "disabled":
            if w.mode == "online":
                os.environ["WANDB_MODE"] = "online"  # the entry points' offline default is only a default
            os.environ.setdefault("WANDB_SILENT", "true")
            wandb_logger = WandbLogger(
                project=w.project, name=name, save_dir=str(self.path), id=wandb_id or w.id, resume="allow",
                group=group if group is not None else w.group, offline=w.mode == "offline", config=config,
            )
            # Lightning always passes anonymous=None to wandb.init, which wandb now warns is a
            # setting without effect on every run; leaving the key out means the same
            getattr(wandb_logger, "_wandb_init", {}).pop("anonymous", None)
            loggers.append(wandb_logger)
        return loggers

    def finish(self, exit_code: int | None = None) -> None:
        """Copy ``summary.json`` into the W&B run summary (W&B sweeps optimise those) and close it."""
        finish_wandb(self.summary if self.writer else None, exit_code)

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)

