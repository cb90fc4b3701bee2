"""A running top-k over score blocks that arrive in row order.

Order: descending score, ties broken by the lower training index. The running state is (Q, <=k); a
block of scores (Q, c) is first cut to its own top-k per row (np.partition, linear time), rows with
ties at the cut are resolved exactly, and the survivors are merged with the state by a small sort.
"""
from __future__ import annotations

import numpy as np


class RunningTopK:
    """Keeps, per query row, the k best (score, index) pairs seen so far."""

    def __init__(self, n_queries: int, k: int):
        self.k = int(k)
        self.values = np.empty((n_queries, 0), dtype=np.float32)
        self.indices = np.empty((n_queries, 0), dtype=np.int64)

    def update(self, block: np.ndarray, offset: int) -> None:
        """Merge a (Q, c) block of scores for training rows [offset, offset + c)."""
        cand_vals, cand_idx = block_topk(block, self.k)
        cand_idx = cand_idx + offset
        vals = np.concatenate([self.values, cand_vals], axis=1)
        idx = np.concatenate([self.indices, cand_idx], axis=1)
        order = sort_desc_then_index(vals, idx)[:, : self.k]
        self.values = np.take_along_axis(vals, order, axis=1)
        self.indices = np.take_along_axis(idx, order, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices (Q, k) int64, scores (Q, k) float32), sorted by descending score."""
        return self.indices, self.values


def sort_desc_then_index(vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per-row argsort by descending value, then ascending index (both (Q, m))."""
    return np.lexsort((idx, -vals), axis=-1)


def block_topk(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `block` (Q, c): the top-min(k, c) (values, local indices), ties to the lower index.

    The result is not sorted; `RunningTopK.update` sorts after merging.
    """
    q, c = block.shape
    if c <= k:
        return block, np.broadcast_to(np.arange(c, dtype=np.int64), (q, c))
    idx = np.argpartition(block, c - k, axis=1)[:, c - k:]
    vals = np.take_along_axis(block, idx, axis=1)
    # The k-th largest value per row; a row whose count of values >= it exceeds k has ties at the
    # cut, and argpartition may have kept a higher index over a lower one: redo such rows exactly.
    kth = vals.min(axis=1)
    tied = np.flatnonzero((block >= kth[:, None]).sum(axis=1) > k)
    for r in tied:
        cand = np.flatnonzero(block[r] >= kth[r])
        keep = cand[np.lexsort((cand, -block[r, cand]))[:k]]
        idx[r] = keep
        vals[r] = block[r, keep]
    return vals, idx.astype(np.int64, copy=False)
