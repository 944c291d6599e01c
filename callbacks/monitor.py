"""The contract between memorization monitors and what acts on them.

A monitor (SolidMark, the extraction probes, or any callback a user adds) publishes a
:class:`MonitorResult` after every evaluation; the memorization controls are handed the
monitors at construction and read ``monitor.latest``. Nobody looks monitors up by class
name or reads their internals, and a monitor never reaches into another callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import lightning.pytorch as pl

__all__ = ["BudgetSignal", "MonitorResult", "Monitor"]


@dataclass(frozen=True)
class BudgetSignal:
    """A memorization count against its chance level (what a stop rule compares)."""

    eidetic: float
    chance: float
    p_value: float


@dataclass(frozen=True)
class MonitorResult:
    """One evaluation of one monitor.

    ``flagged``: ids of training images this evaluation has per-image evidence of
    memorization for (a per-image test under false-discovery control, or a generation that
    copies that very image) — the images a control may exclude. ``budget``: count vs chance
    per SolidMark δ, for stop rules (empty for monitors without one).
    """

    source: str
    step: int
    flagged: frozenset[str] = frozenset()
    budget: Mapping[float, BudgetSignal] = field(default_factory=dict)

    def signal(self, delta: float) -> BudgetSignal | None:
        for d, value in self.budget.items():
            if abs(float(d) - float(delta)) < 1e-12:
                return value
        return None


class Monitor(pl.Callback):
    """Base of every memorization monitor: ``source`` names it, ``latest`` is its newest result."""

    source: str = "monitor"

    def __init__(self) -> None:
        super().__init__()
        self.latest: MonitorResult | None = None

    def publish(self, result: MonitorResult) -> None:
        self.latest = result
