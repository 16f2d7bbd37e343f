"""Embeddings kept on disk between runs: a float32 ``.npy`` file beside a ``.json`` record of its row count,
dimension and the sha256 of its rows. `effir eval` keeps corpus embeddings this way, `effir distill` the parent's
embeddings of its training texts.

An entry is used only when its record is there (the record is written last, so a killed write is never used) and the
file matches it; a damaged entry is deleted with one line on stderr, and the caller computes the embeddings again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from .files import write_json


def record_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def read(path: Path, rows: int, dim: int, chunk_rows: int = 65536) -> np.ndarray | None:
    """The cached ``(rows, dim)`` float32 embeddings at ``path`` (memory-mapped), checked against their record;
    ``None`` when there is no finished entry, or when it is damaged (then it is deleted, saying so on stderr)."""
    path = Path(path)
    if not (path.exists() and record_path(path).exists()):
        return None
    try:
        record = json.loads(record_path(path).read_text())
        array = np.load(path, mmap_mode="r")
        if array.dtype != np.float32 or array.shape != (rows, dim) or (record.get("rows"), record.get("dim")) != (
                rows, dim):
            raise ValueError(f"{array.shape} {array.dtype} rows, expected ({rows}, {dim}) float32")
        digest = hashlib.sha256()
        for start in range(0, rows, chunk_rows):
            digest.update(np.ascontiguousarray(array[start:start + chunk_rows]).tobytes())
        if digest.hexdigest() != record.get("sha256"):
            raise ValueError("checksum mismatch")
    except (OSError, ValueError, AttributeError) as e:  # truncated, wrong shape, altered, unreadable record
        print(f"effir: cached embeddings {path} are damaged ({e}); discarded, computing them again", file=sys.stderr)
        discard(path)
        return None
    return array


def discard(path: Path) -> None:
    Path(path).unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)


class Writer:
    """Write ``(rows, dim)`` float32 embeddings block by block, in row order, into a cache entry: a temporary file
    renamed into place by :meth:`close`, the record last."""

    def __init__(self, path: Path, rows: int, dim: int):
        self.path, self.rows, self.dim = Path(path), rows, dim
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}.npy")
        self.store = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        self.digest = hashlib.sha256()
        self.filled = 0

    def put(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        self.store[self.filled:self.filled + len(block)] = block
        self.digest.update(block.tobytes())
        self.filled += len(block)

    def close(self) -> None:
        if self.filled != self.rows:
            raise ValueError(f"{self.filled} of {self.rows} rows written to {self.path}")
        self.store.flush()
        del self.store
        os.replace(self.tmp, self.path)
        write_json(record_path(self.path), {"rows": self.rows, "dim": self.dim, "sha256": self.digest.hexdigest()})


def write(path: Path, array: np.ndarray) -> None:
    writer = Writer(path, *array.shape)
    writer.put(array)
    writer.close()
