"""The comparison tool's schema (``compare.py``): settings trained with the same data, seed and budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from eidetic.config import Section, choice_problem

__all__ = ["CompareConfig", "ComparisonSetting", "QualitySettings", "LadderSettings", "QUERY_SECTIONS"]


CLASSIFIER_FOLDS = 5  # cross-validation folds of the real-vs-generated classifier


def unseen_minimum(knn_k: int) -> int:
    """Images each side needs for the unseen-image measures: a k-NN manifold needs k + 1
    points, the classifier one image per fold."""
    return max(CLASSIFIER_FOLDS, int(knn_k) + 1)


@dataclass
class QualitySettings(Section):
    enabled: bool = True
    num_samples: int = 64  # seeded samples per setting, captions cycled from the training set
    steps: int = 25
    guidance: float = 3.0
    batch_size: int = 32
    seed: int = 0
    feature_seed: int = 0  # seed of the local random conv feature extractor
    # real images never trained on for precision/recall and the classifier (built-in data: this
    # many fresh crops overlapping no data-set crop; folder data: its held-out split); 0: off
    reference: int = 128
    knn_k: int = 3  # k of the precision/recall k-NN manifolds

    def problems(self) -> list[str]:
        out = [f"{n} must be >= 1, got {getattr(self, n)}" for n in ("num_samples", "steps", "batch_size", "knn_k") if getattr(self, n) < 1]
        if self.reference < 0:
            out.append(f"reference must be >= 0, got {self.reference}")
        elif self.reference > 0:
            need = unseen_minimum(self.knn_k)
            out += [f"{n} must be >= {need} for the unseen-image measures (or quality.reference=0 to turn them off), got {getattr(self, n)}"
                    for n in ("num_samples", "reference") if getattr(self, n) < need]
        return out


@dataclass
class LadderSettings(Section):
    """Memorization per rung of the data's duplication ladder (``data.duplicate.ladder``), scored
    after every setting on all repeated training images and a seeded sample of single and
    held-out ones (:mod:`eidetic.ladder`): SolidMark with the setting's own ``solidmark``
    settings, the ``detectors`` with its ``extraction`` settings, and full generations (the
    fraction copying the caption's own image: ground truth no detector produced). Queries
    go through the setting's ``inference_mitigation``. Skipped when nothing is repeated."""

    enabled: bool = True
    singles: int = 100  # single training images scored beside the repeated ones
    heldout: int = 100  # held-out images scored
    detectors: list[str] = field(default_factory=lambda: ["denoising_confidence"])  # caption-level detectors (AUC per rung vs single)
    generations: int = 4  # full generations per caption for the copy rate
    steps: int = 25
    guidance: float = 3.0
    threshold: float = 0.1  # a generation copies an image within this RMS ([0, 1] scale) and nearest/second-nearest < 1/3
    batch_size: int = 256
    seed: int = 0
    n_boot: int = 1000  # bootstrap resamples of each AUC interval

    def problems(self) -> list[str]:
        from eidetic.extraction import DETECTORS

        out = [f"{n} must be >= 1, got {getattr(self, n)}" for n in ("generations", "steps", "batch_size") if getattr(self, n) < 1]
        out += [f"{n} must be >= 0, got {getattr(self, n)}" for n in ("singles", "heldout", "n_boot") if getattr(self, n) < 0]
        if self.enabled and self.singles < 1:
            out.append("singles must be >= 1: every rung is compared with single images")
        if not 0 < self.threshold < 1:
            out.append(f"threshold must be in (0, 1), got {self.threshold}")
        return out + [p for d in self.detectors for p in choice_problem("detectors", d, tuple(DETECTORS))]


# what an inference-time setting may change: how the trained model is queried, not how it trains
QUERY_SECTIONS = ("inference_mitigation", "solidmark", "extraction")


@dataclass
class ComparisonSetting(Section):
    name: str = "baseline"
    overrides: list[str] = field(default_factory=list)  # training key=value overrides of this setting only
    # an inference-time setting: evaluate the trained model of the setting named here (same seed) with
    # this setting's overrides, which may only touch inference_mitigation / solidmark / extraction keys;
    # it trains nothing
    model_of: Optional[str] = None

    def problems(self) -> list[str]:
        bad = [o for o in self.overrides if "=" not in o]
        out = [f"overrides must be key=value strings, got {bad}"] if bad else []
        if not self.name or "/" in self.name:
            out.append(f"name must be a non-empty name without '/', got {self.name!r}")
        if self.model_of is not None:
            training = [o for o in self.overrides if o.split("=", 1)[0].split(".", 1)[0] not in QUERY_SECTIONS]
            if training:
                out.append(f"an inference-time setting (model_of={self.model_of}) may only override {', '.join(QUERY_SECTIONS)} keys, got {training}")
        return out


@dataclass
class CompareConfig(Section):
    name: str = "mitigations"
    out: Optional[str] = None  # default: runs/compare-<name>
    overwrite: bool = False  # replace existing setting runs in out (otherwise an error)
    resume: bool = False  # keep settings that already finished in out, run the rest
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # several training seeds: every setting runs once per seed (empty: [seed])
    workers: int = 1  # settings run in this many single-threaded processes at once (1: in this process)
    base: list[str] = field(default_factory=list)  # training config files (relative to the repository root)
    overrides: list[str] = field(default_factory=list)  # training overrides shared by every setting
    share_autoencoder: bool = True  # train the first-stage autoencoder once (OUT/shared/) and use it in every setting
    delta: float = 0.05  # SolidMark delta reported (one of solidmark.deltas)
    quality: QualitySettings = field(default_factory=QualitySettings)
    ladder: LadderSettings = field(default_factory=LadderSettings)
    settings: list[ComparisonSetting] = field(default_factory=lambda: [ComparisonSetting()])
    # run only these settings (and the training settings their model_of names); the others are left
    # as they are in out, and with resume=true their finished rows still appear in the report
    only: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        if not self.settings:
            out.append("settings needs at least one entry")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            out.append(f"setting names must be unique, got {names}")
        trained = {s.name for s in self.settings if s.model_of is None}
        for s in self.settings:
            if s.model_of is not None and s.model_of not in trained:
                out.append(f"setting {s.name!r}: model_of={s.model_of!r} must name a training setting (one without model_of) of {sorted(trained)}")
        for n in self.only:
            out += choice_problem("only", n, tuple(names))
        if len(set(self.seeds)) != len(self.seeds):
            out.append(f"seeds must be distinct, got {list(self.seeds)}")
        if self.workers < 1:
            out.append(f"workers must be >= 1, got {self.workers}")
        return out
