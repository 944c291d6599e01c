"""Images in and out: the one decoder, the one folder walk and the one caption reader.

Training, protection and imitation all read images through :func:`decode_image`, so the same
file becomes the same pixels everywhere:

* the EXIF orientation is applied (pixels match what an image viewer shows);
* transparency is composited on white (the RGB under a transparent pixel is arbitrary);
* 16-bit and float images are scaled to 8 bits; grayscale and palette images become RGB.

Folders follow the Hugging Face ``imagefolder`` layout: images anywhere below the folder
(sub-folders included, hidden files skipped) and an optional ``metadata.jsonl`` whose rows
give ``file_name`` (relative POSIX path) and ``text`` (the caption).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "IMAGE_EXTENSIONS", "METADATA", "decode_image", "to_rgb_uint8", "image_files", "parse_captions", "read_captions",
    "fit_to_resolution", "to_tensor", "save_png",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
METADATA = "metadata.jsonl"


def to_rgb_uint8(image) -> np.ndarray:
    """Any PIL image or image array -> (H, W, 3) uint8 (see the module docstring for the rules)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            from skimage.util import img_as_ubyte

            arr = img_as_ubyte(arr)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[-1] == 1:
            return np.ascontiguousarray(np.repeat(arr, 3, axis=-1))
        image = Image.fromarray(np.ascontiguousarray(arr))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12)
        return np.repeat((arr * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def decode_image(path: str | Path) -> np.ndarray:
    """The image file at ``path`` as (H, W, 3) uint8; raises whatever PIL raises for a bad file."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        return to_rgb_uint8(ImageOps.exif_transpose(im))


def image_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) below ``folder``, sorted; hidden files and ``metadata.jsonl`` are skipped."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS and p.name != METADATA]
    return images, others


def parse_captions(folder: str | Path) -> tuple[dict[str, str], list[str]]:
    """(``file_name`` -> caption of every good line, one description per malformed line with
    its line number) of ``folder/metadata.jsonl``; no metadata file means no captions.

    The caption is the ``text`` column (the imagefolder convention), else ``caption``, else "".
    """
    path = Path(folder) / METADATA
    if not path.exists():
        return {}, []
    captions, bad = {}, []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[Path(row["file_name"]).as_posix()] = str(row.get("text", row.get("caption", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            bad.append(f"line {lineno}: {line[:80]!r} ({type(exc).__name__}: {exc})")
    return captions, bad


def bad_metadata_message(folder: str | Path, bad: list[str]) -> str:
    return (
        f"{Path(folder) / METADATA}: {len(bad)} line(s) are not JSON objects with 'file_name' and 'text' (Hugging Face "
        "imagefolder convention):\n    " + "\n    ".join(bad)
    )


def read_captions(folder: str | Path, error: type[Exception] = ValueError) -> dict[str, str]:
    """``file_name`` (POSIX path relative to ``folder``) -> caption, from ``folder/metadata.jsonl``
    (:func:`parse_captions`). Malformed lines raise ``error`` naming every one of them with its
    line number."""
    captions, bad = parse_captions(folder)
    if bad:
        raise error(bad_metadata_message(folder, bad))
    return captions


def fit_to_resolution(arr: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (Lanczos) and centre-crop a square."""
    from PIL import Image

    h, w = arr.shape[:2]
    scale = resolution / min(h, w)
    image = Image.fromarray(arr)
    if scale != 1:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.LANCZOS)
    w2, h2 = image.size
    left, top = (w2 - resolution) // 2, (h2 - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # np.asarray of a PIL image is read-only; torch warns about sharing it
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """(3, H, W) in [-1, 1] -> an 8-bit PNG, written crash-safely."""
    from PIL import Image

    from eidetic.io import atomic_write

    levels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    with atomic_write(path, "wb") as fh:
        Image.fromarray(levels.permute(1, 2, 0).numpy()).save(fh, format="PNG")
