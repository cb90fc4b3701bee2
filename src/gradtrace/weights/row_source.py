"""Ψ's rows as the weight learner reads them: every row (one process), or one torchrun rank's share of them, and how
each pass over them becomes the job's.

    rows = RowSource(fitted)                                # one process: every row, no communication
    rows = RowSource(fitted, Shard(view, n=N, group=group))  # a rank: `fitted` holds Ψ of `view`'s rows only

Everything of the learner that grows with N is a pass over Ψ's rows. Each pass here runs over this process's rows
and, on a rank, its result is merged over the ranks so that every rank holds the job's result, with the same bits:

- `stats`: S = ΨᵀΨ and the column sums summed over ranks (float64 all-reduce), the row-norm maxima their maximum
  (which the float32 error bounds of the certificate use);
- `top` (float32) and `top64` (float64, the final certificate's passes for queries it does not cover): each rank its
  rows' best `take` per query with their global row and score, merged to the job's best `take` by the rule of one
  process (descending score, ties to the lower row);
- `contributions`: per (query, row) pair the per-group sums of φ(q) ⊙ ψ(n), computed by the rank holding the row
  (the others add zeros, which is exact); the pools' rows and the final top-k's exact contributions;
- `dense`: the (Q, N, M) float64 tensor of the dense path (small by construction), each rank its columns;
- `snr_at`: the SNR objective at fixed weights in one float64 pass (the label-free λ choice).

The steps see only the pools, G_q and S, so they run identically on every rank with no communication. A rank's
passes are those of one process on its rows: a row's scores and contributions are the same products of the same Ψ
row. Sums over rows are not the same bits: S takes float32 products per row chunk, and a rank's chunks start at its
first row, so S agrees with one process's to float32 rounding (it enters only the noise term, whose G_q are kept in
float32 anyway); float64 sums (the dense path's noise, `snr_at`'s) are only added in another order (ranks' partial
sums, then their sum).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradtrace.errors import UserError
from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.rows import ShardRows, effective_chunk_rows, row_chunks
from gradtrace.methods.topk import RunningTopK, sort_desc_then_index
from gradtrace.ranks import all_gather, all_reduce_blocks, local_rank
from gradtrace.weights.noise import PsiStats, group_starts
from gradtrace.weights.psi_passes import PsiSource, pick_device, psi_stats_fast, top_pass
from gradtrace.weights.streamed import per_query_loss, snr_pass


@dataclass
class Shard:
    """One rank's part of a job: the row view it holds (its global rows), the job's N and its process group."""

    view: ShardRows
    n: int
    group: Any


def merge_top(parts: list[tuple[np.ndarray, np.ndarray]], take: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `take` per query (global rows, scores) of the ranks' parts [(global rows (Q, t_r), scores), ...]: by
    descending score, ties to the lower row, the order of one process's running top-k."""
    idx = np.concatenate([p[0] for p in parts], axis=1)
    vals = np.concatenate([p[1] for p in parts], axis=1)
    order = sort_desc_then_index(vals, idx)[:, :take]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)


class RowSource:
    """The learner's passes over Ψ (module docstring); `n` is the job's number of training rows."""

    def __init__(self, fitted: FittedMethod, shard: Shard | None = None, *,
                 device: str | torch.device | None = None):
        self.fitted, self.shard = fitted, shard
        self.n = fitted.n_train if shard is None else int(shard.n)
        if shard is not None and len(shard.view) != fitted.n_train:
            raise UserError(f"a rank's fitted method holds {fitted.n_train} rows but its share has "
                            f"{len(shard.view)}; fit it on the share's rows")
        if device is None and shard is not None and torch.cuda.is_available():  # a rank takes its node's own GPU
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        self.device = pick_device(device)
        self.starts = group_starts(fitted.group_slices)
        self._source: PsiSource | None = None
        self._stats: PsiStats | None = None

    @property
    def source(self) -> PsiSource:
        """This process's rows of Ψ in float32 chunks (on the device)."""
        if self._source is None:
            self._source = PsiSource(self.fitted.psi, self.device)
        return self._source

    @property
    def split(self) -> bool:
        """Whether the rows are split over ranks."""
        return self.shard is not None

    # ---- passes ------------------------------------------------------------------------------------
    def stats(self, progress: bool = False) -> PsiStats:
        """S = ΨᵀΨ, the row-norm maxima and column means over the job's rows (`psi_passes.psi_stats_fast`); computed
        once per source and kept (every objective of one learning, the holdout guard's included, reads the same Ψ)."""
        if self._stats is None:
            self._stats = self._compute_stats(progress)
        return self._stats

    def _compute_stats(self, progress: bool) -> PsiStats:
        local = psi_stats_fast(self.source, self.fitted.group_slices, progress=progress)
        if self.shard is None:
            return local
        gram, col_sum = all_reduce_blocks([local.gram, local.col_mean * local.n], self.shard.group)
        group_max, norm_max = all_reduce_blocks([local.group_norm_max, np.array([local.norm_max])],
                                                self.shard.group, op="max")
        return PsiStats(gram=gram, group_norm_max=group_max, norm_max=float(norm_max[0]), col_mean=col_sum / self.n,
                        n=self.n)

    def top(self, qw: np.ndarray, take: int, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Float32 scores qw · ψ(n): per query the `take` best (global rows, scores), descending."""
        idx, vals = top_pass(self.source, qw, min(take, self.fitted.n_train), progress=progress)
        return self._merge(idx, vals, take)

    def top64(self, qw: np.ndarray, take: int) -> tuple[np.ndarray, np.ndarray]:
        """Float64 scores of queries qw (U, dim): per query the `take` best (global rows, scores), descending."""
        qw = np.asarray(qw, dtype=np.float64)
        running = RunningTopK(len(qw), min(take, self.fitted.n_train))
        for s, e in row_chunks(self.fitted.n_train, effective_chunk_rows(65536, 8 * (self.fitted.dim + len(qw)))):
            running.update(qw @ np.asarray(self.fitted.psi[s:e], dtype=np.float64).T, s)
        idx, vals = running.result()
        return self._merge(idx, vals, take)

    def contributions(self, phi: np.ndarray, queries: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
        """(P, M) in `phi`'s dtype: for each pair (queries[i], train_rows[i]) the per-group sums of
        φ(q) ⊙ ψ(n), products and sums in that dtype (`phi` (Q, dim) float32 or float64; Ψ rows read ascending)."""
        queries, train_rows = np.asarray(queries, dtype=np.int64), np.asarray(train_rows, dtype=np.int64)
        if self.shard is None:
            return self._local_contributions(phi, queries, train_rows)
        held, local = self.shard.view.local_rows(train_rows)
        out = np.zeros((len(queries), len(self.starts)), dtype=phi.dtype)
        if held.any():
            out[held] = self._local_contributions(phi, queries[held], local[held])
        return all_reduce_blocks([out], self.shard.group)[0].astype(phi.dtype)  # one nonzero term each: exact

    def dense(self, phi_q: np.ndarray, *, chunk_rows: int = 65536) -> np.ndarray:
        """(Q, N, M) float64 contributions c_j(q, n) of every row, reading Ψ in row chunks."""
        fitted = self.fitted
        local = np.empty((phi_q.shape[0], fitted.n_train, fitted.n_groups), dtype=np.float64)
        for start, stop in row_chunks(fitted.n_train, effective_chunk_rows(chunk_rows, 8 * fitted.dim)):
            x = np.asarray(fitted.psi[start:stop], dtype=np.float64)
            for j, (_, s, e) in enumerate(fitted.group_slices):
                local[:, start:stop, j] = phi_q[:, s:e] @ x[:, s:e].T
        if self.shard is None:
            return local
        out = np.zeros((phi_q.shape[0], self.n, fitted.n_groups), dtype=np.float64)
        for (a, b), off in zip(self.shard.view.ranges, self.shard.view.offsets):
            out[:, a:b] = local[:, off:off + b - a]
        return all_reduce_blocks([out], self.shard.group)[0]

    def snr_at(self, phi_q: np.ndarray, k: int, weights: np.ndarray | None = None, *, chunk_rows: int = 65536,
               progress: bool = False) -> float:
        """mean_q L(w; q) over the job's rows for checked float64 query features (`streamed.snr_at`)."""
        idx, top, sumsq = snr_pass(self.fitted, phi_q, k, weights, chunk_rows=chunk_rows, progress=progress)
        if self.shard is not None:
            sumsq = all_reduce_blocks([sumsq], self.shard.group)[0]
            _, top = self._merge(idx, top, k)
        return float(per_query_loss(top.mean(axis=1), np.sqrt(sumsq)).mean())

    # ---- helpers -----------------------------------------------------------------------------------
    def _merge(self, idx: np.ndarray, vals: np.ndarray, take: int) -> tuple[np.ndarray, np.ndarray]:
        """The job's best `take` per query from every rank's (local rows, scores) (`merge_top`). One process: as
        given."""
        if self.shard is None:
            return idx, vals
        return merge_top(all_gather((self.shard.view.global_rows(idx), vals), self.shard.group), take)

    def _local_contributions(self, phi: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Contributions (P, M) of pairs of this process's rows: query by query, its rows of Ψ (read in ascending
        order) times its φ, summed per group."""
        out = np.empty((len(queries), len(self.starts)), dtype=phi.dtype)
        if len(queries) == 0:
            return out
        order = np.argsort(queries, kind="stable")
        q_sorted = queries[order]
        bounds = np.flatnonzero(np.diff(q_sorted)) + 1
        for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
            at = order[s:e][np.argsort(rows[order[s:e]], kind="stable")]
            x = np.asarray(self.fitted.psi[rows[at]], dtype=phi.dtype)
            x *= phi[q_sorted[s]]
            out[at] = np.add.reduceat(x, self.starts, axis=1)
        return out
