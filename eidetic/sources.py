"""Random access to the images of a large set without holding their pixels: a folder in the
Hugging Face ``imagefolder`` layout, or Parquet shards.

A source lists its items once (id, caption and where the encoded image lives, a few hundred
bytes each) and reads one item's encoded bytes on demand; :func:`eidetic.images.decode_image`
turns them into pixels, so a file is the same image here as on the in-memory path.

Parquet is what the Hugging Face Hub serves every data set as and what ``datasets`` writes
(``Dataset.to_parquet``); its columns are read independently, so listing a million ids and
captions never touches the image bytes. Recognised columns:

* the image: ``image`` (the ``datasets`` Image feature, a struct of ``bytes`` and ``path``,
  or plain binary), else ``jpg``/``png``/``webp``/``img`` (webdataset-style names);
* the caption: ``text``, else ``caption``, else none;
* the id: ``file_name``, else ``id``, else the image struct's ``path``, else
  ``SHARD_STEM/INDEX`` (the row's position in the whole listing: unique across shards).

Images are read a row group at a time and the last few row groups are kept, so a reader
that walks a row group's rows (the streaming order does) reads each row group once.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eidetic.images import decode_image, image_files, parse_captions

__all__ = ["ImageItem", "FolderImages", "ParquetImages", "shard_files"]

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
CAPTION_COLUMNS = ("text", "caption")
ID_COLUMNS = ("file_name", "id")


@dataclass(frozen=True)
class ImageItem:
    id: str
    caption: str
    unit: int  # items of one unit are stored together (a row group); reading them together is cheap
    where: tuple  # source-specific: (relative path,) or (shard, row group, row)


class FolderImages:
    """The images below ``root`` (sorted, as :func:`eidetic.images.image_files` lists them) and
    the captions of its ``metadata.jsonl``."""

    kind = "folder"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.captions, self.bad_metadata = parse_captions(self.root)
        files, self.ignored = image_files(self.root)
        self.items = [ImageItem(rel, self.captions.get(rel, ""), 0, (rel,)) for rel in (p.relative_to(self.root).as_posix() for p in files)]

    def location(self, item: ImageItem) -> str:
        return str(self.root / item.where[0])

    def read_bytes(self, item: ImageItem) -> bytes:
        return (self.root / item.where[0]).read_bytes()

    def decode(self, item: ImageItem) -> np.ndarray:
        return decode_image(self.root / item.where[0])


def shard_files(shards: str | Path) -> list[Path]:
    """The Parquet files of ``shards``: one file, every ``*.parquet`` below a directory, or a glob."""
    path = Path(shards)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(path).parts))
    import glob

    return sorted(Path(p) for p in glob.glob(str(shards), recursive=True) if p.endswith(".parquet"))


class ParquetImages:
    """The rows of Parquet shards (see the module docstring for the columns read)."""

    kind = "shards"

    def __init__(self, shards: str | Path, cache_row_groups: int = 2):
        import pyarrow.parquet as pq

        self.files = shard_files(shards)
        self.bad_metadata: list[str] = []
        self.ignored: list[Path] = []
        self.captions: dict[str, str] = {}
        self.items: list[ImageItem] = []
        self._columns: list[str] = []
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_row_groups
        self._readers: dict[int, object] = {}
        unit = 0
        for s, path in enumerate(self.files):
            meta = pq.ParquetFile(path)
            names = meta.schema_arrow.names
            image = next((c for c in IMAGE_COLUMNS if c in names), None)
            if image is None:
                raise ValueError(f"{path}: no image column (looked for {', '.join(IMAGE_COLUMNS)}); columns are {names}")
            self._columns.append(image)
            caption = next((c for c in CAPTION_COLUMNS if c in names), None)
            ident = next((c for c in ID_COLUMNS if c in names), None)
            image_type = meta.schema_arrow.field(image).type
            struct_path = ident is None and hasattr(image_type, "get_field_index") and image_type.get_field_index("path") >= 0
            for g in range(meta.num_row_groups):
                wanted = [c for c in (caption, ident) if c] + ([image] if struct_path else [])
                table = meta.read_row_group(g, columns=wanted) if wanted else None
                rows = meta.metadata.row_group(g).num_rows
                captions = [str(c or "") for c in table.column(caption).to_pylist()] if caption else [""] * rows
                if ident:
                    ids = [str(i) for i in table.column(ident).to_pylist()]
                elif struct_path:
                    ids = [str(v.get("path") or "") for v in table.column(image).to_pylist()]
                else:
                    ids = [""] * rows
                for r in range(rows):
                    self.items.append(ImageItem(ids[r] or f"{path.stem}/{len(self.items)}", captions[r], unit, (s, g, r)))
                unit += 1

    def location(self, item: ImageItem) -> str:
        s, g, r = item.where
        return f"{self.files[s]} (row group {g}, row {r})"

    def __getstate__(self):  # DataLoader workers open their own file handles
        state = dict(self.__dict__)
        state["_readers"], state["_cache"] = {}, OrderedDict()
        return state

    def _row_group(self, s: int, g: int) -> list:
        key = (s, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        import pyarrow.parquet as pq

        if s not in self._readers:
            self._readers[s] = pq.ParquetFile(self.files[s])
        values = self._readers[s].read_row_group(g, columns=[self._columns[s]]).column(0).to_pylist()
        self._cache[key] = values
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return values

    def read_bytes(self, item: ImageItem) -> bytes:
        s, g, r = item.where
        value = self._row_group(s, g)[r]
        if isinstance(value, dict):
            value = value.get("bytes")
        if not value:
            raise ValueError("the row has no image bytes")
        return bytes(value)

    def decode(self, item: ImageItem) -> np.ndarray:
        return decode_image(io.BytesIO(self.read_bytes(item)))
