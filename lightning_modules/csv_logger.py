"""A CSV copy of logged scalars that survives resume and kills (Lightning's CSVLogger truncates it)."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from eidetic.io import atomic_write

__all__ = ["RunCSVLogger"]


class RunCSVLogger(Logger):
    """Writes ``metrics.csv``: one row per logged step (the union of columns), in step order.

    Everything logged at one step, by Lightning or by a callback, lands in that step's row.
    Each checkpoint carries the rows that may still change after it (:meth:`checkpoint_state`,
    written by :class:`callbacks.checkpoint.StepCheckpoint` after the file is saved), and a
    resumed run puts exactly those back (:meth:`restore`): rows the killed run logged after its
    checkpoint are dropped, rows before it are kept, so every step appears once whatever moment
    the run was killed at.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.rows: dict[int, dict] = {}
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

    def _read(self) -> dict[int, dict]:
        if not self.path.exists():
            return {}
        with self.path.open() as fh:
            return {int(r.get("step") or 0): {k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)}

    def _load(self, first_step: int) -> None:
        """Resuming from a checkpoint without metrics state: keep the rows before the first new step."""
        if self._loaded:
            return
        self._loaded = True
        self.rows = {s: r for s, r in self._read().items() if s < first_step}

    @rank_zero_only
    def restore(self, state: dict) -> None:
        """Resume from a checkpoint's :meth:`checkpoint_state`: the file's rows before it, then its own."""
        start = int(state["from_step"])
        rows = {s: r for s, r in self._read().items() if s < start}
        rows.update({int(r["step"]): dict(r) for r in state["rows"]})
        self.rows = dict(sorted(rows.items()))
        self._loaded = True

    def checkpoint_state(self, from_step: int) -> dict:
        """The rows from ``from_step`` on (those a run may still add to after its checkpoint)."""
        return {"from_step": int(from_step), "rows": [dict(r) for s, r in self.rows.items() if s >= from_step]}

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        step = int(step or 0)
        self._load(step)
        row = self.rows.setdefault(step, {"step": step})
        row.update({k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()})

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def save(self) -> None:
        if not self.rows:
            return
        rows = [self.rows[s] for s in sorted(self.rows)]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_write(self.path) as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
