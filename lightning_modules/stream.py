"""The streaming data path (``data.source=stream``): images decoded, bordered and resized in
DataLoader workers as training reads them, from a folder or Parquet shards
(:mod:`eidetic.sources`), never held in memory as a whole.

Before training one pass reads every image's encoded bytes (in DataLoader workers): a content
digest (exact duplicates), the header's size (too-small images), whether it opens at all, and,
when near-duplicate removal is on, the perceptual thumbnail (:func:`eidetic.mitigations.perceptual_features`).
What stays in memory is a few hundred bytes per image: id, caption, key, where it lives.

The epoch order is a pure function of (seed, epoch): the units (Parquet row groups; a folder
is one unit) are shuffled, and the items inside each unit, so a worker walking its batches
reads a row group once rather than once per image; for a folder this is one permutation of
the whole set, the in-memory sampler's own. Each DDP process takes a contiguous, equal share
of whole batches (the remainder is dropped, as the in-memory loader drops its last partial
batch), so no image is seen twice per epoch; worker ``w`` of ``W`` produces batches
``w, w + W, ...`` of its process, the order the DataLoader collects them in, so the batches
are the same whatever the number of workers. A resumed run starts at the batch its global
step says, as the in-memory sampler does: exact for one process.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from eidetic.borders import add_border
from eidetic.images import decode_image, fit_to_resolution

__all__ = ["ProbeResult", "probe_items", "epoch_order", "StreamingBorderedDataset", "StreamLoader"]


@dataclass
class ProbeResult:
    digest: bytes | None  # blake2b-128 of the encoded bytes; None when unreadable
    size: tuple[int, int]  # (width, height) from the header
    error: str | None
    features: torch.Tensor | None  # perceptual thumbnail, when asked for


class _Probe(Dataset):
    def __init__(self, source, resolution: int, feature_size: int | None, small_images: str):
        self.source, self.resolution, self.feature_size, self.small_images = source, resolution, feature_size, small_images

    def __len__(self) -> int:
        return len(self.source.items)

    def __getitem__(self, i: int) -> ProbeResult:
        from PIL import Image

        try:
            data = self.source.read_bytes(self.source.items[i])
            if not data:
                return ProbeResult(None, (0, 0), "empty file", None)
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
            features = None
            too_small = min(size) < self.resolution and self.small_images != "upscale"
            if self.feature_size and not too_small:
                from eidetic.mitigations import perceptual_features

                arr = fit_to_resolution(decode_image(io.BytesIO(data)), self.resolution)
                features = perceptual_features(torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None], self.feature_size)[0]
            return ProbeResult(hashlib.blake2b(data, digest_size=16).digest(), size, None, features)
        except Exception as exc:  # PIL raises many types for bad files
            return ProbeResult(None, (0, 0), f"{type(exc).__name__}: {exc}", None)


def probe_items(source, resolution: int, feature_size: int | None, small_images: str, num_workers: int = 0,
                chunk: int = 256) -> list[ProbeResult]:
    """One :class:`ProbeResult` per item of ``source``, read in ``num_workers`` DataLoader workers."""
    loader = DataLoader(_Probe(source, resolution, feature_size, small_images), batch_size=chunk, num_workers=num_workers,
                        collate_fn=list, shuffle=False)
    return [r for batch in loader for r in batch]


def epoch_order(units: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Positions 0..len(units)-1 in the epoch's order: units shuffled, then items within each."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    n = len(units)
    distinct = np.unique(units)
    if len(distinct) <= 1:
        return torch.randperm(n, generator=g).numpy()
    unit_rank = np.empty(int(distinct.max()) + 1, dtype=np.int64)
    unit_rank[distinct] = torch.randperm(len(distinct), generator=g).numpy()
    within = torch.rand(n, generator=g, dtype=torch.float64).numpy()
    return np.lexsort((within, unit_rank[units]))


class StreamingBorderedDataset(IterableDataset):
    """Batches of training items (canvas in [-1, 1], caption, id, record index), decoded in the
    worker that yields them. ``entries`` lists the record of every training item (a duplicated
    image once per copy); ``item_of`` maps a record to its source item."""

    def __init__(self, source, entries: np.ndarray, item_of: np.ndarray, ids: list[str], captions: list[str],
                 keys: np.ndarray, resolution: int, border: int, batch_size: int, seed: int):
        self.source, self.entries, self.item_of = source, np.asarray(entries, dtype=np.int64), np.asarray(item_of, dtype=np.int64)
        self.ids, self.captions, self.keys = ids, captions, np.asarray(keys, dtype=np.float64)
        self.resolution, self.border, self.batch_size, self.seed = resolution, border, batch_size, seed
        self.units = np.array([source.items[i].unit for i in self.item_of[self.entries]], dtype=np.int64)
        self.epoch, self.start, self.rank, self.world = 0, 0, 0, 1

    # ---- the epoch's share of this process ----------------------------------------------
    def per_rank(self, world: int | None = None) -> int:
        """Items each process trains on per epoch: whole batches, equal for every process."""
        world = world or self.world
        n, step = len(self.entries), self.batch_size * world
        return (n // step) * self.batch_size if n >= step else n // world

    def batches_per_epoch(self, world: int | None = None) -> int:
        return -(-self.per_rank(world) // self.batch_size)

    def begin(self, epoch: int, consumed_batches: int | None, rank: int = 0, world: int = 1) -> None:
        """Set the epoch and this process; ``consumed_batches`` (of this process, since the
        start of training) says where a resumed epoch starts."""
        self.rank, self.world = int(rank), max(1, int(world))
        nb = self.batches_per_epoch()
        # Lightning creates an epoch's iterator before it counts a finished epoch of a resumed run
        # (a checkpoint taken at an epoch's last batch), so the consumed batches decide too
        self.epoch = max(int(epoch), (consumed_batches or 0) // nb if nb else 0)
        offset = (consumed_batches or 0) - self.epoch * nb
        self.start = offset if 0 < offset < nb else 0

    def rank_items(self) -> np.ndarray:
        """Entry positions this process trains on this epoch, in order."""
        order = epoch_order(self.units, self.seed, self.epoch)
        share = self.per_rank()
        return order[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        # a whole epoch, also when this one resumes part-way: Lightning counts an epoch's batches
        # once, and a resumed epoch's batch counter already includes the ones trained before
        return self.batches_per_epoch()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        items = self.rank_items()
        b = self.batch_size
        for k in range(self.start + worker, self.batches_per_epoch(), workers):
            yield self._batch(items[k * b : (k + 1) * b])

    def _batch(self, positions: np.ndarray) -> dict:
        records = self.entries[positions]
        images = []
        for r in records.tolist():
            item = self.source.items[int(self.item_of[r])]
            try:
                arr = self.source.decode(item)
            except Exception as exc:
                raise RuntimeError(f"could not read {self.source.location(item)} ({type(exc).__name__}: {exc})") from exc
            images.append(torch.from_numpy(np.array(fit_to_resolution(arr, self.resolution))).permute(2, 0, 1))
        pixels = torch.stack(images).float() / 127.5 - 1.0
        canvases = add_border(pixels, torch.from_numpy(self.keys[records]), self.border)
        return {
            "pixel_values": canvases,
            "caption": [self.captions[r] for r in records.tolist()],
            "id": [self.ids[r] for r in records.tolist()],
            "index": torch.from_numpy(records.copy()),
        }


class StreamLoader(DataLoader):
    """A DataLoader of :class:`StreamingBorderedDataset` that sets the epoch and the resume
    position (``position()`` -> (epoch, consumed batches, rank, world)) before each epoch, in
    the main process, so fresh workers start from it."""

    def __init__(self, dataset: StreamingBorderedDataset, position: Callable[[], tuple] | None = None, num_workers: int = 0):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.position = position
        self.epochs_started = 0

    def __iter__(self):
        if self.position is not None:
            epoch, consumed, rank, world = self.position()
        else:  # no trainer attached (e.g. the autoencoder stage): each pass over the loader is the next epoch
            epoch, consumed, rank, world = self.epochs_started, None, 0, 1
        self.epochs_started += 1
        self.dataset.begin(epoch, consumed, rank, world)
        return super().__iter__()
