"""Row-chunked passes over large feature matrices, storage for the transformed training features Ψ, and the row
view of one torchrun rank's share of a store (`ShardRows`).

Training features may be a read-only `np.memmap` of millions of rows; every pass reads them in row
blocks and never makes a whole dense copy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

# Upper bound on the bytes of one working block (e.g. a float64 copy of a feature chunk, or a Q x rows
# score block); a requested chunk_rows is lowered to respect it, never raised.
BLOCK_BYTES = 256 * 2**20


def effective_chunk_rows(chunk_rows: int, bytes_per_row: int, budget: int = BLOCK_BYTES) -> int:
    """`chunk_rows`, lowered so that one block stays under `budget` bytes (at least one row)."""
    return max(1, min(int(chunk_rows), budget // max(1, int(bytes_per_row))))


def row_chunks(n: int, chunk_rows: int, *, progress: bool = False, desc: str = "rows") -> Iterator[tuple[int, int]]:
    """Yield (start, stop) row ranges covering [0, n) in blocks of `chunk_rows`; tqdm when `progress`."""
    starts = range(0, n, chunk_rows)
    if progress:
        starts = tqdm(starts, total=(n + chunk_rows - 1) // chunk_rows, desc=desc, unit="chunk")
    for start in starts:
        yield start, min(start + chunk_rows, n)


def allocate_psi(n: int, k: int, path: str | os.PathLike | None = None) -> np.ndarray:
    """An (n, k) float32 array for Ψ: in memory, or a writable `.npy` memmap at `path` for large n."""
    if path is None:
        return np.empty((n, k), dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, k))


def finish_psi(psi: np.ndarray) -> np.ndarray:
    """Flush a memmap Ψ and reopen it read-only (so later scoring cannot modify it); in-memory Ψ is returned."""
    if isinstance(psi, np.memmap) and psi.filename is not None:
        psi.flush()
        filename = psi.filename
        del psi
        return np.load(filename, mmap_mode="r")
    return psi


def as_float32_rows(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of `x` as a float32 array (a view when already float32 and in memory)."""
    block = x[start:stop]
    return np.asarray(block, dtype=np.float32)


class ShardRows:
    """A read-only (n, k) row view of `source` over the global row ranges `ranges` (ascending, disjoint), in their
    order: local row i is the i-th row of the ranges. Slices read only their rows (a view when they fall in one
    range)."""

    ndim = 2

    def __init__(self, source, ranges: list[tuple[int, int]]):
        self.source = source
        self.ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        self.offsets = np.cumsum([0] + [b - a for a, b in self.ranges])
        self.shape = (int(self.offsets[-1]), int(source.shape[1]))
        self.dtype = np.dtype(source.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def global_rows(self, local) -> np.ndarray:
        """Global row indices of local rows `local` (any shape)."""
        local = np.asarray(local, dtype=np.int64)
        which = np.searchsorted(self.offsets, local, side="right") - 1
        starts = np.asarray([a for a, _ in self.ranges], dtype=np.int64)
        return starts[which] + (local - self.offsets[which])

    def local_rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(mask: which global `rows` this view holds, their local indices (0 where not held)), both rows' shape."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.ranges:
            return np.zeros(rows.shape, dtype=bool), np.zeros(rows.shape, dtype=np.int64)
        starts = np.asarray([a for a, _ in self.ranges], dtype=np.int64)
        stops = np.asarray([b for _, b in self.ranges], dtype=np.int64)
        which = np.clip(np.searchsorted(starts, rows, side="right") - 1, 0, len(starts) - 1)
        held = (rows >= starts[which]) & (rows < stops[which])
        return held, np.where(held, self.offsets[which] + rows - starts[which], 0)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("ShardRows takes row slices of step 1")
            parts = []
            for (a, b), off in zip(self.ranges, self.offsets):
                lo, hi = max(start, off), min(stop, off + b - a)
                if lo < hi:
                    parts.append(self.source[a + lo - off:a + hi - off])
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts) if parts else np.asarray(self.source[0:0])
        if isinstance(key, tuple):
            raise IndexError("ShardRows takes row indices only")
        return self.source[self.global_rows(key)]
