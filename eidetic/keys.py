"""Per-image values drawn from the image's id by a keyed hash: its key, its split, its rank.

A value that depends only on (id, seed, purpose) needs no pass over the whole set and no
order: the key map of a million images can be written as the ids stream past, a crash and a
restart give every image the same key, and two processes agree without talking. Each purpose
("key", "split", "duplicate", ...) is a separate hash, so an image's key says nothing about
its split.

The in-memory sources (builtin, tiles, folder) keep drawing keys in order from the seed
(:func:`eidetic.borders.make_keys`), so their runs stay reproducible as before; the streaming
source uses these.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

__all__ = ["id_uniform", "id_uniforms", "id_key", "id_split", "lowest_ranked"]

_UNIT = float(2**53)


def id_uniform(image_id: str, seed: int, purpose: str) -> float:
    """A number uniform in [0, 1) that is a pure function of (``image_id``, ``seed``, ``purpose``).

    BLAKE2b keyed with the seed and personalised with the purpose; the top 53 bits of the
    digest make a float64 that is exactly representable and strictly below 1.
    """
    if len(purpose.encode()) > 16:
        raise ValueError(f"purpose must be at most 16 bytes, got {purpose!r}")
    digest = hashlib.blake2b(str(image_id).encode("utf-8"), digest_size=8, key=str(int(seed)).encode(), person=purpose.encode()).digest()
    return (int.from_bytes(digest, "big") >> 11) / _UNIT


def id_uniforms(ids: Iterable[str], seed: int, purpose: str) -> np.ndarray:
    """:func:`id_uniform` of every id (float64 array)."""
    return np.fromiter((id_uniform(i, seed, purpose) for i in ids), dtype=np.float64)


def id_key(image_id: str, seed: int) -> float:
    """The SolidMark key of ``image_id`` in [0, 1) for a run keyed by ``seed``."""
    return id_uniform(image_id, seed, "key")


def id_split(image_id: str, seed: int, heldout_fraction: float) -> str:
    """"heldout" for a ``heldout_fraction`` of ids (in expectation), else "train"."""
    return "heldout" if id_uniform(image_id, seed, "split") < heldout_fraction else "train"


def lowest_ranked(ids: Sequence[str], count: int, seed: int, purpose: str) -> list[str]:
    """The ``count`` ids with the smallest hash for ``purpose``, in that order: a seeded random
    choice that does not depend on the order of ``ids`` (ties broken by id)."""
    import heapq

    return [i for _, i in heapq.nsmallest(int(count), ((id_uniform(i, seed, purpose), i) for i in ids))]
