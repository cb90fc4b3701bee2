"""Row-chunked passes over large feature matrices, and storage for the transformed training features Ψ.

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
