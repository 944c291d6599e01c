"""Crash-safe writing: every file and directory a run leaves behind goes through here.

A writer fills a temporary name beside the target (same directory, so same file system) and
renames it into place only when it is complete; a process killed at any moment leaves either
the previous version or the new one, never a torn file. Checkpoints (the Lightning
:class:`~callbacks.checkpoint.AtomicCheckpointIO`), key maps, tokenizers, autoencoders,
pipelines, reports, plots and summaries all use these helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "atomic_write", "atomic_directory", "write_text_atomic", "write_json_atomic", "write_jsonl_atomic", "torch_save_atomic",
    "copy_atomic", "write_npz_atomic", "update_summary", "read_summary", "JsonlChunkWriter",
]


@contextmanager
def atomic_write(path: str | Path, mode: str = "w"):
    """Write to a temporary file beside ``path`` and rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole.

    A directory cannot be swapped in one rename while the old one exists, so the old one is
    first renamed aside (``.NAME.old``) and removed after the new one is in place: a kill in
    between leaves the complete new directory, or the complete old one under ``.NAME.old``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def copy_atomic(source: str | Path, path: str | Path) -> None:
    with open(source, "rb") as src, atomic_write(path, "wb") as fh:
        shutil.copyfileobj(src, fh)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def _jsonable(value: Any):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


class JsonlChunkWriter:
    """A JSONL file written a chunk of rows at a time, for files too large to build in memory.

    Rows go to ``.NAME.partial`` beside ``path``; after every chunk the partial file is
    fsynced and its committed length recorded (atomically) in ``.NAME.progress``. ``close()``
    renames the complete file to ``path``. A process killed at any moment leaves ``path``
    as it was (absent or the previous complete version), and a new writer with
    ``resume=True`` cuts the partial file back to its last committed chunk and reports in
    ``rows_done`` how many rows are already there, so the caller skips them.
    """

    def __init__(self, path: str | Path, chunk_rows: int = 10_000, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.progress = self.path.with_name(f".{self.path.name}.progress")
        self.chunk_rows = max(1, int(chunk_rows))
        self.rows_done, committed = 0, 0
        if resume and self.partial.exists() and self.progress.exists():
            state = json.loads(self.progress.read_text())
            self.rows_done, committed = int(state["rows"]), int(state["bytes"])
        self._fh = open(self.partial, "r+b" if committed else "wb")
        self._fh.truncate(committed)
        self._fh.seek(committed)
        self._pending: list[str] = []

    def write(self, row: dict) -> None:
        self._pending.append(json.dumps(row, default=_jsonable) + "\n")
        if len(self._pending) >= self.chunk_rows:
            self.commit()

    def commit(self) -> None:
        """Make every row written so far durable."""
        if not self._pending:
            return
        self._fh.write("".join(self._pending).encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows_done += len(self._pending)
        self._pending = []
        write_text_atomic(self.progress, json.dumps({"rows": self.rows_done, "bytes": self._fh.tell()}))

    def close(self) -> Path:
        self.commit()
        self._fh.close()
        os.replace(self.partial, self.path)
        self.progress.unlink(missing_ok=True)
        return self.path

    def abandon(self) -> None:
        """Close without publishing (the committed chunks stay for a later ``resume``)."""
        self._fh.close()


def write_npz_atomic(path: str | Path, **arrays: Any) -> None:
    """A compressed ``.npz`` of ``arrays`` (strings as unicode arrays: loadable without pickle)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_summary(run_dir: str | Path, section: str, values: dict) -> dict:
    """Replace one section of ``run_dir/summary.json``, keeping the others."""
    summary = read_summary(run_dir)
    summary[section] = values
    write_json_atomic(Path(run_dir) / "summary.json", summary)
    return summary
