"""A CSV copy of logged scalars that survives resume (Lightning's CSVLogger truncates it)."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from eidetic.io import atomic_write

__all__ = ["RunCSVLogger"]


class RunCSVLogger(Logger):
    """Writes ``metrics.csv`` (one row per logged step, union of columns).

    On resume it keeps the rows of steps before the resumed step and drops later ones
    (those were never part of the checkpointed history), then appends.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict] = []
        self._loaded = False

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    @rank_zero_experiment
    def experiment(self):
        return self

    def _load(self, first_step: int) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path.exists():
            with self.path.open() as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r.get("step") or 0) < first_step]

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        step = int(step or 0)
        self._load(step)
        row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        if self.rows and int(self.rows[-1]["step"]) == step:
            self.rows[-1].update(row)
        else:
            self.rows.append(row)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def save(self) -> None:
        if not self.rows:
            return
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_write(self.path) as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
