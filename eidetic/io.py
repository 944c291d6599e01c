"""Crash-safe file writing for run-directory artefacts (key maps, reports, summaries)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

__all__ = ["atomic_write", "atomic_directory", "write_text_atomic", "write_json_atomic", "write_jsonl_atomic", "write_npz_atomic", "update_summary", "read_summary"]


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
def atomic_directory(directory: str | Path):
    """Yield a temporary directory beside ``directory`` that replaces it on success: a crash
    mid-write leaves the old one intact."""
    import shutil

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        yield tmp
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
