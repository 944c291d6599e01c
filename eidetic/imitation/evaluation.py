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


PASS_PSNR = 30.0  # the audit's bar for fixed teachers (Spingarn & Michaeli report ~31 dB+)


@dataclass
class HeldoutPair:
    name: str  # the photograph, plus its input degradation for restoration teachers
    x: torch.Tensor  # (3, H, W) teacher input
    y: torch.Tensor  # (3, sH, sW) teacher output
    record: dict | None = None  # what the teacher recorded for this input (drawn / estimated level)
    photo: str = ""
    input_level: float | None = None  # degradation level of the input (restoration teachers)


def heldout_pairs(
    teacher: Teacher,
    names: Iterable[str],
    exclude: Sequence[np.ndarray] = (),
    crop: int = 256,
) -> list[HeldoutPair]:
    """Teacher outputs on held-out photographs (central ``crop``; 0 = whole image).

    Any photograph pixel-identical to an image in ``exclude`` (the training example's source)
    is skipped, so aliases (``cat`` is ``chelsea``) cannot leak the example into the test set.
    A restoration teacher gets each photograph degraded at every one of its held-out
    levels (``teacher.inputs``): the example's level for a fixed teacher, other levels for
    a blind one. The negative control draws afresh per image, as it would in deployment.
    """
    excluded = {_fingerprint(e) for e in exclude}
    pairs = []
    for name in names:
        full = load_image(name)
        if _fingerprint(full) in excluded:
            continue
        clean = center_crop(full, min(crop, *full.shape[:2])) if crop > 0 else full
        inputs = teacher.inputs
        levels = inputs.heldout_levels if inputs is not None else (None,)
        for level in levels:
            image = clean if level is None else inputs.apply(clean, level, key=name)
            label = name if level is None else f"{name} ({inputs.label(level)})"
            n_calls = len(teacher.calls)
            output = teacher(image)
            record = teacher.calls[-1] if len(teacher.calls) > n_calls else None
            pairs.append(HeldoutPair(label, to_tensor(image), to_tensor(output), record, name, level))
    if not pairs:
        raise ImitationError(
            "no held-out images left after excluding the training example: list more in eval.images"
        )
    return pairs


def evaluate_student(
    student: nn.Module, pairs: Sequence[HeldoutPair], scale: int, bar_db: float = PASS_PSNR
) -> dict:
    """Per-image and mean PSNR/SSIM of student(x) vs teacher(x), each image beside its
    identity baseline (the input itself vs the teacher's output) and the ``bar_db`` bar."""
    from eidetic.stats import mean_and_standard_error

    per_image = {}
    for pair in pairs:
        student_m = image_metrics(apply_student(student, pair.x), pair.y)
        identity_m = image_metrics(identity_prediction(pair.x, scale), pair.y)
        per_image[pair.name] = {
            **student_m,
            "identity_psnr": identity_m["psnr"],
            "identity_ssim": identity_m["ssim"],
            "meets_bar": bool(student_m["psnr"] >= bar_db),
            "photo": pair.photo or pair.name,
        }
        if pair.input_level is not None:
            per_image[pair.name]["input_level"] = pair.input_level
        if pair.record is not None:
            per_image[pair.name]["teacher_record"] = pair.record

    def mean(key):
        return float(np.mean([v[key] for v in per_image.values()]))

    _, psnr_se = mean_and_standard_error([v["psnr"] for v in per_image.values()])
    return {
        "psnr": mean("psnr"),
        "psnr_se": psnr_se,
        "ssim": mean("ssim"),
        "psnr_min": float(min(v["psnr"] for v in per_image.values())),
        "identity_psnr": mean("identity_psnr"),
        "identity_ssim": mean("identity_ssim"),
        "bar_db": bar_db,
        "n_images": len(per_image),
        "n_meeting_bar": int(sum(v["meets_bar"] for v in per_image.values())),
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
