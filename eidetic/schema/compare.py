"""The comparison tool's schema (``compare.py``): settings trained with the same data, seed and budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from eidetic.config import Section

__all__ = ["CompareConfig", "ComparisonSetting", "QualitySettings"]


@dataclass
class QualitySettings(Section):
    enabled: bool = True
    num_samples: int = 64  # seeded samples per setting, captions cycled from the training set
    steps: int = 25
    guidance: float = 3.0
    batch_size: int = 32
    seed: int = 0
    feature_seed: int = 0  # seed of the local random conv feature extractor

    def problems(self) -> list[str]:
        return [f"{n} must be >= 1, got {getattr(self, n)}" for n in ("num_samples", "steps", "batch_size") if getattr(self, n) < 1]


@dataclass
class ComparisonSetting(Section):
    name: str = "baseline"
    overrides: list[str] = field(default_factory=list)  # training key=value overrides of this setting only

    def problems(self) -> list[str]:
        bad = [o for o in self.overrides if "=" not in o]
        out = [f"overrides must be key=value strings, got {bad}"] if bad else []
        if not self.name or "/" in self.name:
            out.append(f"name must be a non-empty name without '/', got {self.name!r}")
        return out


@dataclass
class CompareConfig(Section):
    name: str = "mitigations"
    out: Optional[str] = None  # default: runs/compare-<name>
    overwrite: bool = False  # replace existing setting runs in out (otherwise an error)
    resume: bool = False  # keep settings that already finished in out, run the rest
    seed: int = 0
    base: list[str] = field(default_factory=list)  # training config files (relative to the repository root)
    overrides: list[str] = field(default_factory=list)  # training overrides shared by every setting
    share_autoencoder: bool = True  # train the first-stage autoencoder once (OUT/shared/) and use it in every setting
    delta: float = 0.05  # SolidMark delta reported (one of solidmark.deltas)
    quality: QualitySettings = field(default_factory=QualitySettings)
    settings: list[ComparisonSetting] = field(default_factory=lambda: [ComparisonSetting()])

    def problems(self) -> list[str]:
        out = []
        if not self.settings:
            out.append("settings needs at least one entry")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            out.append(f"setting names must be unique, got {names}")
        return out
