"""Image folders in the Hugging Face ``imagefolder`` layout: captions and decoding.

One reader for ``metadata.jsonl`` (the training data module, ``protect.py`` and the
mimicry evaluation all read the same folders, so they must agree on what a caption is),
and one decoder for images a user hands us to perturb.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["METADATA", "read_captions", "load_rgb"]

METADATA = "metadata.jsonl"


def read_captions(folder: str | Path, error: type[Exception] = ValueError) -> dict[str, str]:
    """``file_name`` (POSIX path relative to ``folder``) -> caption, from ``folder/metadata.jsonl``.

    The caption is the ``text`` column (the imagefolder convention), else ``caption``, else "".
    No metadata file means no captions. A malformed line raises ``error`` (callers pass
    their own error type so their entry points report it like any other input problem).
    """
    path = Path(folder) / METADATA
    if not path.exists():
        return {}
    captions = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[Path(row["file_name"]).as_posix()] = str(row.get("text", row.get("caption", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise error(
                f"{path}:{lineno}: expected a JSON object with 'file_name' and 'text' "
                f"(Hugging Face imagefolder convention), got {line[:80]!r} ({exc})"
            ) from exc
    return captions


def load_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 with the EXIF orientation applied, so pixels match what a viewer shows."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im).convert("RGB")
        return np.asarray(im, dtype=np.uint8).copy()
