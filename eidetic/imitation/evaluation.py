"""How well a student reproduces its teacher on held-out images, and saving/loading students."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .images import (
    ImitationError,
    _fingerprint,
    center_crop,
    load_image,
    to_tensor,
)
from .students import apply_student, build_student, identity_prediction
from .teachers import Teacher


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of one ``(3,H,W)`` prediction against its target, both in [0,1]."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    p, t = pred[None].float().clamp(0, 1), target[None].float().clamp(0, 1)
    return {
        "psnr": float(peak_signal_noise_ratio(p, t, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(p, t, data_range=1.0)),
    }


@dataclass
class HeldoutPair:
    name: str
    x: torch.Tensor  # (3, H, W) teacher input
    y: torch.Tensor  # (3, sH, sW) teacher output
    draw: dict | None = None  # what a blind teacher drew for this image


def heldout_pairs(
    teacher: Teacher,
    names: Iterable[str],
    exclude: Sequence[np.ndarray] = (),
    crop: int = 256,
) -> list[HeldoutPair]:
    """Teacher outputs on held-out photographs (central ``crop``; 0 = whole image).

    Any photograph pixel-identical to an image in ``exclude`` (the training example's source)
    is skipped, so aliases (``cat`` is ``chelsea``) cannot leak the example into the test set.
    A blind teacher draws its parameters once per image here, as it would in deployment.
    """
    excluded = {_fingerprint(e) for e in exclude}
    pairs = []
    for name in names:
        full = load_image(name)
        if _fingerprint(full) in excluded:
            continue
        image = center_crop(full, min(crop, *full.shape[:2])) if crop > 0 else full
        n_draws = len(teacher.draws)
        output = teacher(image)
        draw = teacher.draws[-1] if len(teacher.draws) > n_draws else None
        pairs.append(HeldoutPair(name, to_tensor(image), to_tensor(output), draw))
    if not pairs:
        raise ImitationError(
            "no held-out images left after excluding the training example: list more in eval.images"
        )
    return pairs


def evaluate_student(
    student: nn.Module, pairs: Sequence[HeldoutPair], scale: int
) -> dict:
    """Per-image and mean PSNR/SSIM of student(x) vs teacher(x), with the identity baseline."""
    per_image = {}
    for pair in pairs:
        student_m = image_metrics(apply_student(student, pair.x), pair.y)
        identity_m = image_metrics(identity_prediction(pair.x, scale), pair.y)
        per_image[pair.name] = {
            **student_m,
            "identity_psnr": identity_m["psnr"],
            "identity_ssim": identity_m["ssim"],
        }
        if pair.draw is not None:
            per_image[pair.name]["teacher_draw"] = pair.draw

    def mean(key):
        return float(np.mean([v[key] for v in per_image.values()]))

    return {
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        "psnr_min": float(min(v["psnr"] for v in per_image.values())),
        "identity_psnr": mean("identity_psnr"),
        "identity_ssim": mean("identity_ssim"),
        "per_image": per_image,
    }


def save_student(student: nn.Module, path: str | Path, **metadata: str) -> None:
    """Weights as safetensors; the architecture travels in the metadata so :func:`load_student` can rebuild it."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "student": json.dumps(student.config),
        **{k: str(v) for k, v in metadata.items()},
    }
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()},
        str(path),
        metadata=meta,
    )


def load_student(path: str | Path) -> nn.Module:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        config = json.loads(fh.metadata()["student"])
    student = build_student(**config)
    student.load_state_dict(load_file(str(path)))
    return student.eval()
