"""Sections several tools share: the run directory and logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from eidetic.config import Section, choice_problem

__all__ = ["RunSettings", "WandbSettings", "LoggingSettings"]


@dataclass
class RunSettings(Section):
    dir: Optional[str] = None  # default: runs/<date>-<time>-<name>
    name: str = "default"
    # training: a run.dir that already holds a run is refused unless resumed (train.resume=last) or
    # this is true, which moves the old run aside to <dir>.old-<date>-<time> (never deletes it)
    overwrite: bool = False
    report: bool = True  # training: write report.html / report.md at the end (python -m workflows.report RUN rewrites them)
    # show every third-party notice on the console (also: EIDETIC_VERBOSE_CONSOLE=1); by default the
    # benign ones (tips, deprecations inside libraries, fallbacks) are filtered
    verbose_console: bool = False


@dataclass
class WandbSettings(Section):
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "eidetic"
    group: Optional[str] = None
    id: Optional[str] = None  # set on the first run; resume reuses it
    log_keymap: bool = True

    def problems(self) -> list[str]:
        return choice_problem("mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class LoggingSettings(Section):
    csv: bool = True  # metrics.csv in the run directory
    wandb: WandbSettings = field(default_factory=WandbSettings)
