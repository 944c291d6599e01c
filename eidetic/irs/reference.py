"""What IRS is measured against: reference means fitted on real images, the threshold, and the
built-in reference from the scikit-image photographs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .degradations import DEGRADATIONS, degrade
from .kernels import image_statistics
from .pentagon import pentagon_area, radii
from .settings import _TINY, INVERTED, MODES, STATISTICS, IRSSettings
from .surrogate import soft_image_statistics


def _batches(source, batch_size: int) -> Iterable[torch.Tensor]:
    """Image batches from a tensor, or an iterable of tensors / (tensor, ...) / {'images': tensor}."""
    if torch.is_tensor(source):
        for i in range(0, source.shape[0], batch_size):
            yield source[i : i + batch_size]
        return
    for item in source:
        if isinstance(item, dict):
            if "images" not in item:
                raise ValueError(
                    f"a dict batch needs an 'images' entry, got keys {sorted(item)}"
                )
            item = item["images"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        if not torch.is_tensor(item):
            raise ValueError(
                f"expected image tensors (B, 3, H, W) in [-1, 1], got {type(item).__name__}"
            )
        yield item if item.ndim == 4 else item.unsqueeze(0)


@dataclass
class IRSReference:
    """What IRS is measured against: the reference means of the five statistics (exact and
    surrogate), the settings they were computed with, the radius mode, and the real/fake
    threshold. Saved as a small JSON file."""

    means: tuple[float, ...]
    soft_means: tuple[float, ...]
    settings: IRSSettings = field(default_factory=IRSSettings)
    mode: str = "two_sided"
    threshold: float | None = None
    threshold_rule: str = ""
    n_images: int = 0
    resolution: tuple[int, int] | None = None
    source: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown IRS mode {self.mode!r}; use one of {MODES}")
        if self.mode == "paper" and not self.settings.is_paper:
            raise ValueError(
                "mode 'paper' is the published IRS and needs its statistics: use "
                "settings=IRSSettings.paper() (or leave settings unset when fitting); "
                "other settings go with mode 'two_sided'"
            )
        for name, values in (("means", self.means), ("soft_means", self.soft_means)):
            if len(values) != len(STATISTICS) or not all(
                math.isfinite(v) and v > 0 for v in values
            ):
                raise ValueError(
                    f"IRSReference.{name} must be {len(STATISTICS)} positive finite numbers, got {values}"
                )
        self.means = tuple(float(v) for v in self.means)
        self.soft_means = tuple(float(v) for v in self.soft_means)

    # -- fitting --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        images,
        settings: IRSSettings | None = None,
        mode: str = "two_sided",
        batch_size: int = 256,
        source: str = "",
        threshold: str | None = "youden",
        false_fake_rate: float = 0.05,
    ) -> "IRSReference":
        """Fit the reference means from real images (a tensor or an iterable of batches).

        The real/fake threshold is fitted on the same reference data:

        * ``"youden"`` (default): every reference image is also degraded four ways
          (``degrade``: blur, noise, JPEG, flatten at their default strengths); the
          threshold is the cut on IRS that maximises Youden's J between the reference
          images and their degraded copies;
        * ``"quantile"``: the ``false_fake_rate`` quantile of the reference images' own
          IRS (no fakes needed; calls that fraction of real images fake, but lets most
          degraded images pass because real images vary a lot);
        * ``None``: no threshold.
        """
        if threshold not in ("youden", "quantile", None):
            raise ValueError(
                f"threshold must be 'youden', 'quantile' or None, got {threshold!r}"
            )
        if settings is None:
            settings = IRSSettings.paper() if mode == "paper" else IRSSettings()
        exact, soft, fakes, resolution = [], [], [], None
        for batch in _batches(images, batch_size):
            resolution = tuple(batch.shape[-2:])
            exact.append(image_statistics(batch, settings).double().cpu())
            with torch.no_grad():
                soft.append(soft_image_statistics(batch, settings).double().cpu())
            if threshold == "youden":
                for i, kind in enumerate(DEGRADATIONS):
                    fakes.append(
                        image_statistics(
                            degrade(batch, kind, seed=len(fakes) + i), settings
                        )
                        .double()
                        .cpu()
                    )
        if not exact:
            raise ValueError("IRSReference.fit got no images")
        exact, soft = torch.cat(exact), torch.cat(soft)
        means = exact.clamp_min(_TINY).mean(0)
        soft_means = soft.clamp_min(_TINY).mean(0)
        if not (means > _TINY).all():
            raise ValueError(
                f"reference images give a zero statistic ({dict(zip(STATISTICS, means.tolist()))}); "
                "are they constant images?"
            )
        ref = cls(
            tuple(means.tolist()),
            tuple(soft_means.tolist()),
            settings,
            mode,
            None,
            "",
            exact.shape[0],
            resolution,
            source,
        )
        if threshold is not None:
            scores = pentagon_area(radii(exact, means, mode))
            fake_scores = (
                pentagon_area(radii(torch.cat(fakes), means, mode)) if fakes else None
            )
            ref.threshold, ref.threshold_rule = fit_threshold(
                scores, fake_scores, false_fake_rate=false_fake_rate
            )
        return ref

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["statistics"] = list(STATISTICS)
        d["inverted"] = list(INVERTED)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IRSReference":
        d = dict(d)
        stats = d.pop("statistics", list(STATISTICS))
        d.pop("inverted", None)
        if list(stats) != list(STATISTICS):
            raise ValueError(
                f"reference lists statistics {stats}, this version computes {list(STATISTICS)}"
            )
        d["settings"] = IRSSettings(**d.get("settings", {}))
        if d.get("resolution") is not None:
            d["resolution"] = tuple(d["resolution"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from eidetic.io import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "IRSReference":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no IRS reference at {path}; fit one with IRSReference.fit(images).save(path)"
            )
        return cls.from_dict(json.loads(path.read_text()))

    def with_threshold(self, threshold: float, rule: str) -> "IRSReference":
        return replace(self, threshold=float(threshold), threshold_rule=rule)


def fit_threshold(
    real_scores, fake_scores=None, false_fake_rate: float = 0.05
) -> tuple[float, str]:
    """A real/fake IRS threshold (an image is called fake when IRS < threshold).

    Without fake scores: the ``false_fake_rate`` quantile of the real scores. With fake
    scores: the cut that maximises Youden's J = TPR(real) - FPR(fake) over all midpoints
    between sorted scores. Returns (threshold, a one-line description of the rule).
    """
    real = torch.as_tensor(real_scores, dtype=torch.float64).flatten()
    if real.numel() == 0:
        raise ValueError("fit_threshold needs at least one real score")
    if fake_scores is None:
        if not 0 <= false_fake_rate < 1:
            raise ValueError(
                f"false_fake_rate must be in [0, 1), got {false_fake_rate}"
            )
        t = torch.quantile(real, false_fake_rate).item()
        return (
            t,
            f"{false_fake_rate:g} quantile of IRS over {real.numel()} reference images",
        )
    fake = torch.as_tensor(fake_scores, dtype=torch.float64).flatten()
    allv = torch.cat([real, fake]).sort().values
    cuts = torch.cat([allv[:1] - 1e-9, 0.5 * (allv[1:] + allv[:-1]), allv[-1:] + 1e-9])
    tpr = (real.view(1, -1) >= cuts.view(-1, 1)).double().mean(1)
    fpr = (fake.view(1, -1) >= cuts.view(-1, 1)).double().mean(1)
    j = tpr - fpr
    best = int(torch.argmax(j))
    return (
        cuts[best].item(),
        f"Youden-optimal cut between {real.numel()} real and {fake.numel()} degraded images (J={j[best].item():.3f})",
    )


def builtin_photographs() -> list[np.ndarray]:
    """The built-in photographs (:mod:`eidetic.photos`, the one catalogue) as (H, W, 3) uint8 arrays."""
    from eidetic.photos import PHOTOS, load_photo

    return [load_photo(name) for name in PHOTOS]


def random_crops(
    photos: Sequence[np.ndarray],
    n: int,
    size: int | tuple[int, int],
    seed: int = 0,
    min_scale: float = 0.15,
    max_scale: float = 0.6,
) -> torch.Tensor:
    """``n`` random square crops resized to ``size`` -> (n, 3, H, W) in [-1, 1].

    A crop's side is a uniform fraction in [min_scale, max_scale] of the photo's shorter
    side, so crops mix close-up texture and wider scenes; photos are drawn uniformly.
    The resize is an antialiased bilinear downscale.
    """
    h_out, w_out = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, h_out, w_out)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        short = min(img.shape[:2])
        side = max(min(h_out, w_out), int(short * rng.uniform(min_scale, max_scale)))
        side = min(side, short)
        top = rng.integers(img.shape[0] - side + 1)
        left = rng.integers(img.shape[1] - side + 1)
        crop = (
            torch.from_numpy(img[top : top + side, left : left + side])
            .permute(2, 0, 1)
            .float()
            .unsqueeze(0)
        )
        crop = F.interpolate(
            crop,
            size=(h_out, w_out),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        out[i] = (crop[0] / 127.5 - 1).clamp(-1, 1)
    return out


@lru_cache(maxsize=8)
def _default_reference_cached(
    resolution: tuple[int, int], n_crops: int, seed: int, mode: str
) -> IRSReference:
    crops = random_crops(builtin_photographs(), n_crops, resolution, seed=seed)
    return IRSReference.fit(
        crops,
        mode=mode,
        source=f"skimage.data photographs, {n_crops} random crops, seed {seed}",
    )


def default_reference(
    resolution: int | tuple[int, int] = 32,
    n_crops: int = 512,
    seed: int = 0,
    mode: str = "two_sided",
) -> IRSReference:
    """The built-in reference at a resolution (``mode="paper"``: with the paper's
    statistics, :meth:`IRSSettings.paper`): fitted on demand from ``n_crops`` random
    crops of the scikit-image photographs and cached in memory (statistics such as the
    Laplacian variance depend on the image size, so one shipped file could not serve
    every resolution). Threshold: Youden-optimal between the crops and their degraded
    copies (see ``IRSReference.fit``)."""
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    return _default_reference_cached(
        tuple(int(r) for r in resolution), int(n_crops), int(seed), mode
    )
