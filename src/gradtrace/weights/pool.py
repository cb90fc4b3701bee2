"""Candidate pools for the signal term: the top-C training rows per query, refreshed only when needed.

The signal term needs T_k(w, q), the k best rows under the current weights. Each query keeps a pool of
C ≫ k rows (its top-C under the weights w_r of its last refresh, found by a streamed pass over Ψ with
`FittedMethod.topk`) and their per-group contributions (Q, C, M), stored in float32 (computed from the
float32 Ψ; the same values as the dense tensor up to float32 rounding). A step takes its top-k inside
the pool, which equals the dense top-k whenever no row outside the pool beats the k-th best pool score.

refresh="exact" (rigorous). t_q is the best score outside the pool at w_r (the (C+1)-th score of the
pass plus a float32 rounding margin). Ranking is scale-free and τ_w = α τ_{w_r} + Σ_j d_j c_j with
d = w − α w_r for any α ≥ 0, and |c_j(q, n)| ≤ a_j(q) = ‖φ_j(q)‖ · max_n ‖ψ_j(n)‖, so every row
outside the pool has

    τ_w(q, n) ≤ α t_q + Σ_j a_j(q) |d_j|          (α ≥ 0 chosen per query to minimise this, exactly).

At that α the sum is tightened per query: the groups with the largest terms keep them and the rest are
bounded together by Cauchy–Schwarz in feature space, ‖(d ⊙ φ(q))_rest‖ · max_n ‖ψ(n)‖, taking the best
split. This is B_q(w). A query is refreshed when B_q(w) ≥ s_k(q; w) − margin, s_k the k-th best pool
score, so the selected top-k is the dense one at every step (up to float32 ties). Queries that would
fail at the weights extrapolated a few steps ahead join the same pass (a pass for few queries costs one
read of Ψ either way). Cauchy–Schwarz is loose by about √k_j per group for unstructured features, so
early steps, where every weight moves, refresh many queries.

refresh="fast" (approximate). No per-step bound: all pools are rebuilt every R steps and at the last
step. Each rebuild counts "entrants", rows of the new top-k that were outside the old pool; R doubles
(up to 32) after a rebuild without entrants and halves after one with entrants. Between rebuilds a row
outside the pool can be missing from T_k; the final weights' top-k and loss are exact.
"""
from __future__ import annotations

import numpy as np

from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.noise import PsiStats, group_starts
from gradtrace.weights.row_source import RowSource

TRIGGERS = ("exact", "fast")
_U32 = 2.0 ** -24  # unit roundoff of float32
LOOKAHEAD_STEPS = 4
MAX_INTERVAL = 32


class CandidatePool:
    """Per-query candidate rows and their contributions; `select(w)` returns top-k positions in the pool."""

    def __init__(self, fitted: FittedMethod, phi_q: np.ndarray, stats: PsiStats, *, size: int, k: int,
                 trigger: str, chunk_rows: int = 65536, rows: RowSource | None = None):
        self.fitted, self.phi_q, self.stats = fitted, phi_q, stats
        self.rows = RowSource(fitted) if rows is None else rows   # the passes over Ψ (one process, or a rank's)
        self.trigger, self.k, self.chunk_rows = trigger, int(k), int(chunk_rows)
        n_q, n, m = phi_q.shape[0], self.rows.n, fitted.n_groups
        self.size = min(int(size), n)
        self.complete = self.size >= n  # the pool holds every row: nothing outside it
        self.starts = group_starts(fitted.group_slices)
        self.phi32 = phi_q.astype(np.float32)
        self.idx = np.zeros((n_q, self.size), dtype=np.int64)
        self.contrib = np.zeros((n_q, self.size, m), dtype=np.float32)
        self.base_w = np.ones((n_q, m), dtype=np.float64)
        self.t = np.full(n_q, np.inf)                     # +inf: never refreshed
        self.phi_norm = np.sqrt(np.add.reduceat(phi_q * phi_q, self.starts, axis=1))  # (Q, M) ‖φ_j(q)‖
        self.a = self.phi_norm * stats.group_norm_max[None, :]  # (Q, M) bound on |c_j(q, n)|
        # float32 rounding of a score (Ψ pass) or a pool score (stored contributions): ≤ eps_rel · Σ_j w_j a_j
        self.eps_rel = 4.0 * (fitted.dim + m + 4) * _U32
        self.step = 0
        self.interval, self.next_rebuild = 1, 0
        self.prev_w: np.ndarray | None = None
        self.passes = self.queries_refreshed = self.entrants = 0

    # ---- one step --------------------------------------------------------------------------
    def select(self, w: np.ndarray, *, last: bool = False) -> np.ndarray:
        """Top-k positions (Q, k) into the pool under weights `w` (M,), refreshing queries as needed."""
        n_q = len(self.t)
        if self.complete or self.trigger == "fast":
            due = self.passes == 0 if self.complete else (self.step >= self.next_rebuild or last)
            if due:
                found = self.refresh(np.arange(n_q), w)
                if not self.complete:
                    self.interval = max(1, self.interval // 2) if found else min(2 * self.interval, MAX_INTERVAL)
                    self.next_rebuild = self.step + self.interval
            scores = self.pool_scores(w)
        else:
            scores = self.pool_scores(w)
            stale = self.stale(w, scores)
            if stale.any():
                rows = np.flatnonzero(stale | self._stale_ahead(w))
                self.refresh(rows, w)
                scores[rows] = self.pool_scores(w, rows)
        self.prev_w = w
        self.step += 1
        return np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]

    def pool_scores(self, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        c = self.contrib if rows is None else self.contrib[rows]
        return c @ w.astype(np.float32)

    def stale(self, w: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Queries whose pool may have lost a top-k row under `w` (bound ≥ k-th pool score − margin)."""
        s_k = -np.partition(-scores, self.k - 1, axis=1)[:, self.k - 1].astype(np.float64)
        margin = self.eps_rel * (self.a @ w)
        return ~(self.bound(w) < s_k - margin)

    def _stale_ahead(self, w: np.ndarray) -> np.ndarray:
        if self.prev_w is None:
            return np.zeros(len(self.t), dtype=bool)
        log_w, log_prev = np.log(np.maximum(w, 1e-300)), np.log(np.maximum(self.prev_w, 1e-300))
        log_ahead = log_w + LOOKAHEAD_STEPS * (log_w - log_prev)
        ahead = np.exp(log_ahead - log_ahead.max())
        ahead /= ahead.sum()
        return self.stale(ahead, self.pool_scores(ahead))

    def bound(self, w: np.ndarray) -> np.ndarray:
        """B_q(w) per query (module docstring); +inf for queries never refreshed, −inf for complete pools."""
        if self.complete:
            return np.full(len(self.t), -np.inf)
        v, a = self.base_w, self.a
        t = np.where(np.isfinite(self.t), self.t, 0.0)
        ratio = w[None, :] / v
        order = np.argsort(ratio, axis=1)
        r = np.take_along_axis(ratio, order, axis=1)
        p = np.take_along_axis(a * v, order, axis=1)
        total = p.sum(axis=1)
        # f(α) = α t + Σ a_j |w_j − α v_j| is convex; right of the i-th breakpoint its slope is
        # t + 2 cum_i − total, so the minimiser is the first breakpoint where that turns >= 0.
        slope = t[:, None] + 2.0 * np.cumsum(p, axis=1) - total[:, None]
        first = np.argmax(slope >= 0, axis=1)
        alpha = np.where(t - total >= 0, 0.0, r[np.arange(len(t)), first])
        d = np.abs(w[None, :] - alpha[:, None] * v)
        # Hybrid: groups A (largest a_j|d_j|) bounded one by one, the rest jointly by Cauchy–Schwarz in
        # feature space, |Σ_{j∉A} d_j c_j| ≤ ‖(d ⊙ φ(q))_{∉A}‖ · max_n ‖ψ(n)‖; best split per query.
        per_group = a * d
        order = np.argsort(-per_group, axis=1)
        cum1 = np.cumsum(np.take_along_axis(per_group, order, axis=1), axis=1)
        sq = np.take_along_axis((d * self.phi_norm) ** 2, order, axis=1)
        rest = np.sqrt(np.maximum(sq.sum(axis=1, keepdims=True) - np.cumsum(sq, axis=1), 0.0))
        joint = np.sqrt(sq.sum(axis=1))
        best = np.minimum(joint * self.stats.norm_max, (cum1 + rest * self.stats.norm_max).min(axis=1))
        out = alpha * t + best
        return np.where(np.isfinite(self.t), out, np.inf)

    # ---- refresh -------------------------------------------------------------------------------
    def refresh(self, rows: np.ndarray, w: np.ndarray) -> int:
        """Rebuild the pools of queries `rows` under `w` with one streamed pass over Ψ; returns entrants."""
        take = min(self.size + 1, self.rows.n)
        idx, top = self.fitted.topk(self.phi_q[rows], take, weights=w, chunk_rows=self.chunk_rows)
        new = idx[:, : self.size]
        if self.complete:
            t = np.full(len(rows), -np.inf)
        else:
            t = top[:, self.size].astype(np.float64) + self.eps_rel * (self.a[rows] @ w)
        seen = np.isfinite(self.t[rows])
        contrib, held = self._new_contributions(rows, new, reuse=seen)
        found = int((~held[seen, : self.k]).sum())          # new top-k rows that were outside the old pool
        self.contrib[rows] = contrib
        self.idx[rows] = new
        self.base_w[rows] = w
        self.t[rows] = t
        self.passes += 1
        self.queries_refreshed += len(rows)
        self.entrants += found
        return found

    def _new_contributions(self, rows: np.ndarray, new: np.ndarray, reuse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(contributions (len(rows), C, M) of pools `new`, mask of entries copied from the query's old pool).

        `new` is sorted by descending score, so mask[:, :k] marks the new top-k rows the old pool held.
        """
        n_rows, c = new.shape
        m = self.fitted.n_groups
        out = np.empty((n_rows * c, m), dtype=np.float32)
        held = np.zeros((n_rows, c), dtype=bool)
        if reuse.any():
            r = np.flatnonzero(reuse)
            old = self.idx[rows[r]]
            order = np.argsort(old, axis=1)
            offset = (np.arange(len(r)) * self.rows.n)[:, None]
            keys_old = (np.take_along_axis(old, order, axis=1) + offset).ravel()
            keys_new = (new[r] + offset).ravel()
            at = np.minimum(np.searchsorted(keys_old, keys_new), keys_old.size - 1)
            hit = (keys_old[at] == keys_new).reshape(len(r), c)
            local = np.clip(at.reshape(len(r), c) - (np.arange(len(r)) * c)[:, None], 0, c - 1)
            src = np.take_along_axis(order, local, axis=1)          # position in the old pool
            rr, cc = np.nonzero(hit)
            out[r[rr] * c + cc] = self.contrib.reshape(-1, m)[rows[r[rr]] * c + src[rr, cc]]
            held[r] = hit
        qi, ci = np.nonzero(~held)
        out[qi * c + ci] = self._contributions(rows[qi], new[qi, ci])
        return out.reshape(n_rows, c, m), held

    def _contributions(self, queries: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
        """Contributions (P, M) float32 of the (query, training row) pairs, computed from float32 φ and Ψ
        (`RowSource.contributions`)."""
        return self.rows.contributions(self.phi32, queries, train_rows)
