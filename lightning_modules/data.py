"""SolidMark-bordered training data from any image source.

Every image gets a key (uniform in [0, 1), reproducible from ``data.key_seed``) painted as
a solid border (eidetic.borders). The key map (``keymap.jsonl``: id, source, caption, key,
copies, split) is written to the run directory before training starts, so a crash never
leaves a run whose keys are unknown.

Bad input never yields a bare traceback or a silently shorter dataset:
- files without an image extension (and metadata.jsonl) are ignored, listed in a warning;
- unreadable image files (corrupt, truncated, zero-byte) are an error listing every one of
  them (``data.bad_files=skip`` turns it into a warning that lists them);
- images are decoded by :func:`eidetic.images.decode_image` (EXIF orientation applied,
  transparency composited on white, 16-bit scaled to 8 bits, grayscale/palette to RGB);
- images smaller than ``data.resolution`` follow ``data.small_images``: error (default),
  upscale, or skip (warning lists them);
- captions in metadata.jsonl for files that do not exist are an error listing them
  (``data.bad_files=skip``: a warning);
- an empty folder, or a folder that does not exist, is an error;
- all problems of a folder are reported together, so one round of fixes is enough.
"""

from __future__ import annotations

import hashlib
import logging
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from eidetic.borders import add_border, make_keys
from eidetic.errors import DataError
from eidetic.images import IMAGE_EXTENSIONS, bad_metadata_message, decode_image, fit_to_resolution, image_files, parse_captions
from eidetic.io import JsonlChunkWriter, write_jsonl_atomic, write_text_atomic
from eidetic.keys import id_key, id_split, lowest_ranked
from eidetic.photos import PHOTOS, load_photo
from eidetic.schema.train import duplication_ladder

__all__ = ["DataError", "Record", "SolidMarkDataModule", "load_folder", "load_builtin", "builtin_unseen_crops"]

log = logging.getLogger(__name__)

_STYLES = ["a photo of", "a close-up of", "a picture of", "a crop of", "a detail of"]


@dataclass
class Record:
    id: str
    source: str
    caption: str
    key: float = 0.0
    copies: int = 1
    split: str = "train"


def _listing(paths: Sequence, limit: int = 20) -> str:
    names = [str(p) for p in paths]
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return "\n    " + "\n    ".join(names[:limit]) + more


def _orphan_problems(root: Path, captions: dict, rel_names: set[str], bad_files: str) -> list[str]:
    orphans = sorted(set(captions) - rel_names)
    if not orphans:
        return []
    message = f"metadata.jsonl has captions for {len(orphans)} file(s) that are not images in {root}:{_listing(orphans)}"
    if bad_files == "skip":
        warnings.warn(message + "\n  (ignored because data.bad_files=skip)", stacklevel=3)
        return []
    return [message + "\n  Add the missing images or remove their lines, or set data.bad_files=skip to ignore them."]


def _unusable_problems(root, broken: list[str], small: list[str], resolution: int, small_images: str, bad_files: str) -> list[str]:
    """Errors (or, as the settings ask, warnings) for unreadable and too-small images."""
    problems = []
    if broken:
        message = f"{len(broken)} image file(s) in {root} could not be read:{_listing(broken)}"
        if bad_files == "skip":
            warnings.warn(message + "\n  (skipped because data.bad_files=skip)", stacklevel=3)
        else:
            problems.append(message + "\n  Remove or fix them, or set data.bad_files=skip to train without them.")
    if small:
        message = f"{len(small)} image(s) in {root} are smaller than data.resolution={resolution}:{_listing(small)}"
        if small_images == "skip":
            warnings.warn(message + "\n  (skipped because data.small_images=skip)", stacklevel=3)
        else:
            problems.append(message + "\n  Lower data.resolution, or set data.small_images=upscale (or skip).")
    return problems


def load_folder(folder: str | Path, resolution: int, small_images: str = "error", bad_files: str = "error") -> tuple[list[Record], np.ndarray]:
    """Images of ``folder`` (with optional HF-imagefolder ``metadata.jsonl``) at ``resolution``.

    Every problem of the folder is found in one pass and reported together: malformed
    metadata lines, unreadable files, images smaller than the resolution.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"data.folder does not exist or is not a directory: {root}")
    problems: list[str] = []
    captions, bad_lines = parse_captions(root)
    if bad_lines:
        problems.append(f"{bad_metadata_message(root, bad_lines)}\n  Fix or remove these lines.")
    images, ignored = image_files(root)
    if ignored:
        warnings.warn(f"ignoring {len(ignored)} file(s) without an image extension in {root}:{_listing([p.relative_to(root) for p in ignored])}", stacklevel=2)
    if not images:
        raise DataError("\n".join([f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})", *problems]))
    problems += _orphan_problems(root, captions, {p.relative_to(root).as_posix() for p in images}, bad_files)

    records, arrays, broken, small = [], [], [], []
    for path in images:
        rel = path.relative_to(root).as_posix()
        try:
            arr = decode_image(path)
        except Exception as exc:  # PIL raises many types for bad files
            broken.append(f"{rel} ({type(exc).__name__}: {exc})" if path.stat().st_size else f"{rel} (empty file)")
            continue
        if min(arr.shape[:2]) < resolution and small_images in ("error", "skip"):
            small.append(f"{rel} ({arr.shape[1]}x{arr.shape[0]})")
            continue
        arrays.append(fit_to_resolution(arr, resolution))
        records.append(Record(id=rel, source=str(path), caption=captions.get(rel, "")))
    problems += _unusable_problems(root, broken, small, resolution, small_images, bad_files)
    if problems:
        raise DataError("\n".join(problems))
    if not records:
        raise DataError(f"no usable images left in {root} after the checks above")
    return records, np.stack(arrays)


def _builtin_draws(num_images: int, resolution: int, shared_caption_fraction: float, seed: int):
    """(index, photo name, (top, left, size), caption) of each built-in crop, in order."""
    rng = random.Random(seed)
    names = list(PHOTOS)
    for i in range(num_images):
        name = names[i % len(names)]
        h, w = load_photo(name).shape[:2]
        size = min(h, w, int(resolution * rng.uniform(1.0, 4.0)))
        top, left = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
        subject = PHOTOS[name]
        if rng.random() < shared_caption_fraction:
            caption = f"a photo of {subject}"
        else:
            caption = f"{rng.choice(_STYLES)} {subject}, detail {i}"
        yield i, name, (top, left, size), caption


def load_builtin(num_images: int, resolution: int, shared_caption_fraction: float, seed: int) -> tuple[list[Record], np.ndarray]:
    """Crops of the photographs that ship with scikit-image, with mixed captions.

    Crops are taken at a random scale (1x-4x the resolution) and downsampled, so they look
    like small photographs, not pixel noise. A ``shared_caption_fraction`` of crops get the
    photo's generic caption (many images, one caption); the rest get a unique caption.
    """
    records, arrays = [], []
    for i, name, (top, left, size), caption in _builtin_draws(num_images, resolution, shared_caption_fraction, seed):
        arrays.append(fit_to_resolution(load_photo(name)[top : top + size, left : left + size], resolution))
        records.append(Record(id=f"{name}-{i:03d}", source=f"skimage.data.{name}", caption=caption))
    return records, np.stack(arrays)


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ta, la, sa), (tb, lb, sb) = a, b
    return ta < tb + sb and tb < ta + sa and la < lb + sb and lb < la + sa


def _unseen_boxes(count: int, num_images: int, resolution: int, shared_caption_fraction: float, seed: int,
                  draw_seed: int, max_tries: int = 10_000) -> list[tuple[str, tuple[int, int, int]]]:
    taken: dict[str, list[tuple[int, int, int]]] = {}
    for _, name, box, _ in _builtin_draws(num_images, resolution, shared_caption_fraction, seed):
        taken.setdefault(name, []).append(box)
    rng = random.Random(draw_seed)
    names = list(PHOTOS)
    out = []
    for i in range(count):
        name = names[i % len(names)]
        h, w = load_photo(name).shape[:2]
        for _ in range(max_tries):
            size = min(h, w, int(resolution * rng.uniform(1.0, 4.0)))
            box = (rng.randrange(h - size + 1), rng.randrange(w - size + 1), size)
            if not any(_overlaps(box, other) for other in taken.get(name, [])):
                break
        else:
            raise DataError(f"no room for another crop of {name} that overlaps none of the {len(taken.get(name, []))} taken: ask for fewer")
        taken.setdefault(name, []).append(box)
        out.append((name, box))
    return out


def builtin_unseen_crops(count: int, num_images: int, resolution: int, shared_caption_fraction: float, seed: int,
                         draw_seed: int = 1) -> np.ndarray:
    """``count`` crops of the built-in photographs, drawn like :func:`load_builtin`'s (photos
    cycled, same scale range), none sharing a pixel with any of the data set's
    ``num_images`` crops (train and held-out alike) or with each other.

    The data set's own held-out split is too small a reference for k-NN measures; these are
    real images from the same distribution that no model trained on this data has seen.
    """
    boxes = _unseen_boxes(count, num_images, resolution, shared_caption_fraction, seed, draw_seed)
    return np.stack([fit_to_resolution(load_photo(name)[t : t + s, l : l + s], resolution) for name, (t, l, s) in boxes])


def dedup_exact(records: list[Record], arrays: np.ndarray) -> tuple[list[Record], np.ndarray, list[str]]:
    seen: dict[bytes, str] = {}
    keep, removed = [], []
    for i, rec in enumerate(records):
        digest = hashlib.blake2b(np.ascontiguousarray(arrays[i]).data, digest_size=16).digest()
        if digest in seen:
            removed.append(f"{rec.id} (identical to {seen[digest]})")
        else:
            seen[digest] = rec.id
            keep.append(i)
    return [records[i] for i in keep], arrays[keep], removed


def _consecutive(items: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), and starts mid-epoch on resume.

    The order is a pure function of the epoch, and ``consumed()`` (samples the trainer has
    already trained on, derived from its global step) says where in the epoch to start. A
    resumed run therefore sees exactly the samples an uninterrupted run would, whatever
    step the checkpoint was taken at.
    """

    def __init__(self, n: int, seed: int, samples_per_epoch: int | None = None, consumed=None):
        self.n, self.seed, self.epoch = n, seed, 0
        self.samples_per_epoch = samples_per_epoch or n
        self.consumed = consumed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start(self) -> int:
        if self.consumed is None:
            return 0
        offset = self.consumed() - self.epoch * self.samples_per_epoch
        return offset if 0 < offset < self.n else 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist()[self.start() :])

    def __len__(self) -> int:
        return self.n - self.start()


class BorderedDataset(Dataset):
    """Training items: (canvas in [-1, 1], caption, id); duplicated images appear ``copies`` times."""

    def __init__(self, pixels: torch.Tensor, records: list[Record], index: list[int], thickness: int):
        self.pixels, self.records, self.index, self.thickness = pixels, records, index, thickness

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        r = self.index[i]
        rec = self.records[r]
        image = self.pixels[r : r + 1].float() / 127.5 - 1.0
        canvas = add_border(image, torch.tensor([rec.key]), self.thickness)[0]
        return {"pixel_values": canvas, "caption": rec.caption, "id": rec.id, "index": r}


class SolidMarkDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DictConfig, seed: int = 0, mitigation: DictConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.mitigation = mitigation  # the config's mitigation section (near-duplicate removal)
        self.near_dedup_removed: list[str] = []
        self.records: list[Record] = []
        self.pixels: torch.Tensor | None = None  # (N, 3, R, R) uint8
        self.dedup_removed: list[str] = []
        self.excluded: set[str] = set()  # ids withheld from training (memorization controls)
        self.source = None  # data.source=stream: the eidetic.sources reader; pixels stay None
        self._item_row: list[int] = []  # data.source=stream: the source item of each record
        self._load()

    # ---- construction ----------------------------------------------------------------
    def _load(self) -> None:
        cfg = self.cfg
        if cfg.border < 1 or cfg.resolution < 8:
            raise DataError(f"need data.resolution >= 8 and data.border >= 1, got {cfg.resolution} and {cfg.border}")
        if cfg.source == "stream":
            self._load_stream()
            return
        if cfg.source == "builtin":
            records, arrays = load_builtin(cfg.num_images, cfg.resolution, cfg.shared_caption_fraction, cfg.key_seed)
        elif cfg.source == "folder":
            if not cfg.folder:
                raise DataError("data.source=folder needs data.folder=PATH")
            records, arrays = load_folder(cfg.folder, cfg.resolution, cfg.small_images, cfg.bad_files)
        elif cfg.source == "tiles":
            from eidetic.tiles import photo_tiles

            rows, arrays = photo_tiles(cfg.resolution, cfg.tile_scale)
            records = [Record(**row) for row in rows]
        else:
            raise DataError(f"data.source must be 'builtin', 'tiles', 'folder' or 'stream', got {cfg.source!r}")
        if cfg.get("instance_prompt"):
            for r in records:
                r.caption = str(cfg.instance_prompt)
        if cfg.dedup:
            records, arrays, self.dedup_removed = dedup_exact(records, arrays)
            if self.dedup_removed:
                warnings.warn(f"data.dedup removed {len(self.dedup_removed)} exact duplicate(s):{_listing(self.dedup_removed)}", stacklevel=2)
        near = self.mitigation.near_dedup if self.mitigation is not None else None
        if near is not None and near.enabled:
            records, arrays = self._near_dedup(records, arrays, near)
        self._split_and_duplicate(records)
        if near is not None and near.enabled and near.collapse_copies:
            for r in records:
                if r.copies > 1:
                    self.near_dedup_removed.append(f"{r.id}: {r.copies - 1} duplicated cop{'y' if r.copies == 2 else 'ies'} (data.duplicate) removed")
                    r.copies = 1
        self.records = self._expand_keys(records)
        order = {id(r): i for i, r in enumerate(records)}
        self.pixels = torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).contiguous()
        # copies with their own key share the pixels of their original
        self._pixel_row = [order[id(r._origin)] if hasattr(r, "_origin") else order[id(r)] for r in self.records]

    def _load_stream(self) -> None:
        """Records (no pixels) of a folder or Parquet shards: keys, split and duplication from
        each id by a keyed hash (eidetic.keys), so they do not depend on the rest of the set."""
        from eidetic.mitigations import near_duplicates
        from eidetic.sources import FolderImages, ParquetImages
        from lightning_modules.stream import probe_items

        cfg = self.cfg
        if bool(cfg.folder) == bool(cfg.get("shards")):
            raise DataError("data.source=stream reads either data.folder=PATH (an image folder) or data.shards=PATH (Parquet files); set one")
        problems: list[str] = []
        if cfg.folder:
            root = Path(cfg.folder)
            if not root.is_dir():
                raise DataError(f"data.folder does not exist or is not a directory: {root}")
            source = FolderImages(root)
            if source.bad_metadata:
                problems.append(f"{bad_metadata_message(root, source.bad_metadata)}\n  Fix or remove these lines.")
            if source.ignored:
                warnings.warn(f"ignoring {len(source.ignored)} file(s) without an image extension in {root}:{_listing([p.relative_to(root) for p in source.ignored])}", stacklevel=3)
            if not source.items:
                raise DataError("\n".join([f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})", *problems]))
            problems += _orphan_problems(root, source.captions, {item.id for item in source.items}, cfg.bad_files)
        else:
            root = Path(cfg.shards)
            try:
                source = ParquetImages(root)
            except (OSError, ValueError) as exc:
                raise DataError(f"data.shards={root}: {exc}") from exc
            if not source.items:
                raise DataError(f"no Parquet rows found at data.shards={root} (a .parquet file, a directory of them, or a glob)")
            counts: dict[str, int] = {}
            for item in source.items:
                counts[item.id] = counts.get(item.id, 0) + 1
            repeated = sorted(i for i, c in counts.items() if c > 1)
            if repeated:
                problems.append(f"{len(repeated)} id(s) appear in more than one row of data.shards={root}:{_listing(repeated)}\n  Ids name images in the key map; make them unique.")
        near = self.mitigation.near_dedup if self.mitigation is not None else None
        near_on = near is not None and near.enabled
        probes = probe_items(source, cfg.resolution, int(near.size) if near_on else None, cfg.small_images, int(cfg.num_workers))
        broken = [f"{item.id} ({p.error})" for item, p in zip(source.items, probes) if p.error]
        small = [f"{item.id} ({p.size[0]}x{p.size[1]})" for item, p in zip(source.items, probes)
                 if not p.error and min(p.size) < cfg.resolution and cfg.small_images in ("error", "skip")]
        problems += _unusable_problems(root, broken, small, cfg.resolution, cfg.small_images, cfg.bad_files)
        if problems:
            raise DataError("\n".join(problems))
        usable = [i for i, p in enumerate(probes) if not p.error and (min(p.size) >= cfg.resolution or cfg.small_images == "upscale")]
        if cfg.dedup:  # the first of identical files stays (the listing order)
            seen: dict[bytes, str] = {}
            keep = []
            for i in usable:
                first = seen.setdefault(probes[i].digest, source.items[i].id)
                if first == source.items[i].id:
                    keep.append(i)
                else:
                    self.dedup_removed.append(f"{source.items[i].id} (identical to {first})")
            usable = keep
            if self.dedup_removed:
                warnings.warn(f"data.dedup removed {len(self.dedup_removed)} exact duplicate(s):{_listing(self.dedup_removed)}", stacklevel=3)
        if near_on and usable:
            found = near_duplicates(torch.stack([probes[i].features for i in usable]), float(near.threshold))
            dropped = {d.removed for d in found}
            self.near_dedup_removed += [f"{source.items[usable[d.removed]].id} (distance {d.distance:.4f} to {source.items[usable[d.kept]].id})" for d in found]
            usable = [i for j, i in enumerate(usable) if j not in dropped]
        del probes
        if not usable:
            raise DataError(f"no usable images left in {root} after the checks above")
        records = []
        for i in usable:
            item = source.items[i]
            rec = Record(id=item.id, source=source.location(item), caption=str(cfg.instance_prompt) if cfg.get("instance_prompt") else item.caption)
            rec._item = i  # type: ignore[attr-defined]
            records.append(rec)
        self._split_and_duplicate(records, hashed=True)
        if near_on and near.collapse_copies:
            for r in records:
                if r.copies > 1:
                    self.near_dedup_removed.append(f"{r.id}: {r.copies - 1} duplicated cop{'y' if r.copies == 2 else 'ies'} (data.duplicate) removed")
                    r.copies = 1
        self.records = self._expand_keys(records, hashed=True)
        self._item_row = [getattr(r, "_origin", r)._item for r in self.records]
        self.source = source

    def _near_dedup(self, records: list[Record], arrays: np.ndarray, near) -> tuple[list[Record], np.ndarray]:
        from eidetic.mitigations import near_duplicates, perceptual_features

        feats = perceptual_features(torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2), int(near.size))
        found = near_duplicates(feats, float(near.threshold))
        dropped = {d.removed for d in found}
        self.near_dedup_removed += [f"{records[d.removed].id} (distance {d.distance:.4f} to {records[d.kept].id})" for d in found]
        keep = [i for i in range(len(records)) if i not in dropped]
        return [records[i] for i in keep], arrays[keep]

    def _split_and_duplicate(self, records: list[Record], hashed: bool = False) -> None:
        """Held-out split and duplication. In-memory sources draw them in order from
        ``key_seed + 1``; ``hashed`` (the streaming source) takes each from the image's id."""
        cfg = self.cfg
        rng = random.Random(cfg.key_seed + 1)
        n = len(records)
        if not 0 <= cfg.heldout_fraction < 1:
            raise DataError(f"data.heldout_fraction={cfg.heldout_fraction} leaves no training images out of {n}")
        if hashed:
            for r in records:
                r.split = id_split(r.id, cfg.key_seed, cfg.heldout_fraction)
            if not any(r.split == "train" for r in records):
                raise DataError(f"data.heldout_fraction={cfg.heldout_fraction} leaves no training images out of {n}")

            def pick(pool: list[Record], k: int, purpose: str) -> list[Record]:
                by_id = {r.id: r for r in pool}
                return [by_id[i] for i in lowest_ranked(list(by_id), k, cfg.key_seed, purpose)]
        else:
            n_held = int(round(cfg.heldout_fraction * n))
            if cfg.heldout_fraction > 0 and n - n_held < 1:
                raise DataError(f"data.heldout_fraction={cfg.heldout_fraction} leaves no training images out of {n}")
            for i in rng.sample(range(n), n_held):
                records[i].split = "heldout"

            def pick(pool: list[Record], k: int, purpose: str) -> list[Record]:
                return rng.sample(pool, k)
        train = [r for r in records if r.split == "train"]
        dup = cfg.duplicate
        if dup.copies < 1:
            raise DataError(f"data.duplicate.copies must be >= 1, got {dup.copies}")
        ids = {r.id for r in records}
        unknown = [i for i in dup.ids if i not in ids]
        if unknown:
            raise DataError(f"data.duplicate.ids names unknown image ids: {unknown[:10]} (ids are listed in keymap.jsonl)")
        chosen = set(dup.ids)
        heldout_dups = [r.id for r in records if r.id in chosen and r.split == "heldout"]
        if heldout_dups:
            raise DataError(f"data.duplicate.ids names held-out images {heldout_dups[:10]}: held-out images are never trained on")
        if dup.fraction > 0:
            k = int(round(dup.fraction * len(train)))
            chosen |= {r.id for r in pick(train, k, "duplicate")}
        for r in train:
            if r.id in chosen:
                r.copies = dup.copies
        # the duplication ladder: rungs of [images, copies], drawn from the images not yet repeated
        free = [r for r in train if r.copies == 1]
        ladder = duplication_ladder(cfg)
        wanted = sum(count for count, _ in ladder)
        if wanted > len(free):
            raise DataError(f"data.duplicate.ladder asks for {wanted} images but only {len(free)} training images are left to repeat"
                            + (" (the built-in data's default positive control; data.duplicate.ladder=[] turns it off)" if dup.ladder is None else ""))
        for (count, copies), picked in zip(ladder, _consecutive(pick(free, wanted, "ladder"), [c for c, _ in ladder])):
            for r in picked:
                r.copies = int(copies)

    def _expand_keys(self, records: list[Record], hashed: bool = False) -> list[Record]:
        out: list[Record] = []
        for r in records:
            if r.copies > 1 and self.cfg.duplicate.own_keys:
                for c in range(r.copies):
                    copy = Record(id=f"{r.id}#{c}", source=r.source, caption=r.caption, copies=r.copies, split=r.split)
                    copy._origin = r  # type: ignore[attr-defined]
                    out.append(copy)
            else:
                out.append(r)
        keys = [id_key(r.id, self.cfg.key_seed) for r in out] if hashed else make_keys(len(out), self.cfg.key_seed).tolist()
        for r, k in zip(out, keys):
            r.key = float(k)
        return out

    # ---- views used by the module and the monitors -----------------------------------
    @property
    def canvas_size(self) -> int:
        return self.cfg.resolution + 2 * self.cfg.border

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    def record_index(self, ids: Sequence[str]) -> list[int]:
        lookup = {r.id: i for i, r in enumerate(self.records)}
        missing = [i for i in ids if i not in lookup]
        if missing:
            raise KeyError(f"unknown image ids: {missing[:10]}")
        return [lookup[i] for i in ids]

    def images(self, ids: Sequence[str]) -> torch.Tensor:
        """Interiors (N, 3, R, R) in [-1, 1] of the given ids (no border)."""
        if self.source is not None:
            if not ids:
                return torch.zeros(0, 3, self.cfg.resolution, self.cfg.resolution)
            arrays = [fit_to_resolution(self.source.decode(self.source.items[self._item_row[i]]), self.cfg.resolution) for i in self.record_index(ids)]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        rows = [self._pixel_row[i] for i in self.record_index(ids)]
        return self.pixels[rows].float() / 127.5 - 1.0

    def canvases(self, ids: Sequence[str]) -> torch.Tensor:
        """Bordered canvases (N, 3, R + 2b, R + 2b) in [-1, 1] of the given ids."""
        idx = self.record_index(ids)
        keys = torch.tensor([self.records[i].key for i in idx])
        return add_border(self.images(ids), keys, self.cfg.border)

    def train_index(self) -> list[int]:
        """Rows of training items, each duplicated image repeated ``copies`` times."""
        index = []
        for i, r in enumerate(self.records):
            if r.split != "train" or r.id in self.excluded:
                continue
            repeat = 1 if self.cfg.duplicate.own_keys and hasattr(r, "_origin") else r.copies
            index += [i] * repeat
        return index

    def write_keymap(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / "keymap.jsonl"
        if self.source is not None:
            # chunk by chunk: every row is a function of its id, so a restarted writer continues
            writer = JsonlChunkWriter(path, chunk_rows=10_000, resume=True)
            for r in self.records[writer.rows_done :]:
                writer.write(asdict(r))
            writer.close()
        else:
            write_jsonl_atomic(path, [asdict(r) for r in self.records])
        if self.dedup_removed:
            write_text_atomic(Path(run_dir) / "dedup_removed.txt", "\n".join(self.dedup_removed) + "\n")
        if self.mitigation is not None and self.mitigation.near_dedup.enabled:
            write_text_atomic(Path(run_dir) / "near_duplicates_removed.txt", "".join(line + "\n" for line in self.near_dedup_removed))
        return path

    def train_dataloader(self) -> DataLoader:
        index = self.train_index()
        if not index:
            raise DataError("no training images left (all held out or excluded)")
        if self.source is not None:
            return self._stream_loader(index)
        rows = [self._pixel_row[i] for i in range(len(self.records))]
        dataset = BorderedDataset(self.pixels[rows], self.records, index, self.cfg.border)
        batch = self.cfg.batch_size
        trainer = self.trainer if self._trainer_attached() else None
        # Under DDP each process gets 1/world of the epoch, so a set that fills a batch here
        # may not fill one per process (e.g. after exclusions): dropping the last batch then
        # leaves a process no batches at all and ends training.
        world = max(1, int(trainer.world_size)) if trainer is not None else 1
        step_samples = batch * world
        drop_last = len(dataset) >= step_samples
        per_epoch = (len(dataset) // step_samples) * step_samples if drop_last else len(dataset)
        consumed = None
        if trainer is not None and not self.excluded:
            # with exclusions the epoch length changed mid-run: start the new epoch at its beginning
            accum = trainer.accumulate_grad_batches
            consumed = lambda: trainer.global_step * accum * step_samples  # noqa: E731
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=EpochSeededSampler(len(dataset), self.seed, per_epoch, consumed),
            num_workers=self.cfg.num_workers,
            drop_last=drop_last,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def _stream_loader(self, index: list[int]) -> DataLoader:
        from lightning_modules.stream import StreamingBorderedDataset, StreamLoader

        dataset = StreamingBorderedDataset(
            self.source, np.asarray(index), np.asarray(self._item_row), [r.id for r in self.records], [r.caption for r in self.records],
            np.array([r.key for r in self.records]), self.cfg.resolution, self.cfg.border, self.cfg.batch_size, self.seed,
        )
        trainer = self.trainer if self._trainer_attached() else None
        position = None
        if trainer is not None:
            def position():
                accum = trainer.accumulate_grad_batches
                # with exclusions the epoch length changed mid-run: start the new epoch at its beginning
                consumed = None if self.excluded else trainer.global_step * accum
                return trainer.current_epoch, consumed, trainer.global_rank, max(1, int(trainer.world_size))

            dataset.begin(0, None, trainer.global_rank, max(1, int(trainer.world_size)))  # its length is per process
        return StreamLoader(dataset, position, num_workers=self.cfg.num_workers)

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False
