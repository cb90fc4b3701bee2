"""The default scalable SNR objective: float32 kernels, per-query refresh schedule, exact final top-k.

Same objective as `snr_loss` on the dense contributions, never building Q × N × M:

- noise: ‖τ_w(q, ·)‖² = wᵀ G_q w with G_q from S = ΨᵀΨ, computed once (`kernels`: float32 products
  summed in float64 per chunk; on CPU numpy's symmetric rank-k update). Per step one (Q·M, M) matvec,
  no pass over Ψ.
- signal: the top-k of each query inside its candidate pool (its top-C rows at its last refresh, with
  their per-group contributions, as in `pool`). Pools are rebuilt by a streamed float32 pass
  (`kernels.top_pass`, on the GPU when present) on a per-query schedule: a query is refreshed
  `first_interval` steps after step 0; its interval doubles (up to `max_interval`) after a refresh
  whose new top-k was already inside the old pool, and halves after one that brought in an outside row
  (an "entrant"). A pass serves all queries due at that step.
- the last step (the returned weights): every query is refreshed, the pool is certified to hold the
  top-k (the (C+1)-th pass score plus its float32 error bound is below the k-th pool score minus its
  error bound; otherwise that query gets a float64 pass over all rows), ties within the float32 error
  are resolved in float64, and the top-k rows' contributions are recomputed in float64. So the final
  top-k is the dense path's exactly (ties to the lower row index) and `final_loss` is the objective
  at the returned weights.

Between refreshes a row outside a query's pool that would have entered its top-k is missed; the
trajectory then differs from the dense path's. `pool_info()` reports the entrants found at refreshes
(the misses that were detected). `refresh="exact"` (`scalable`) proves every step instead, at about
ten times the passes over Ψ (docs/benchmarks.md, "Weight learning at scale").
"""
from __future__ import annotations

import time

import numpy as np
import torch

from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.rows import effective_chunk_rows, row_chunks
from gradtrace.methods.topk import RunningTopK, sort_desc_then_index
from gradtrace.weights.kernels import PsiSource, pick_device, psi_stats_fast, query_grams_fast, top_pass
from gradtrace.weights.objective import ratio_loss
from gradtrace.weights.pool import CandidatePool
from gradtrace.weights.scalable import QuadraticNorm

FIRST_INTERVAL = 8
MAX_INTERVAL = 64
MAX_ROLLBACKS = 32


class LazyPool(CandidatePool):
    """Candidate pools refreshed together on a schedule, misses found at refreshes undone, exact last step.

    After `select`, `rollback` is None or the step the caller must resume from (restoring θ and the
    optimizer as they were before that step); the pool has then already taken in the missed rows.
    """

    def __init__(self, fitted: FittedMethod, phi_q: np.ndarray, stats, source: PsiSource, *, size: int, k: int,
                 first_interval: int = FIRST_INTERVAL, max_interval: int = MAX_INTERVAL,
                 max_rollbacks: int = MAX_ROLLBACKS):
        super().__init__(fitted, phi_q, stats, size=size, k=k, trigger="lazy")
        self.source = source
        self.widths = np.diff(np.append(self.starts, fitted.dim))
        self.interval, self.max_interval = int(first_interval), int(max_interval)
        self.next, self.verified = 0, 0
        self.max_rollbacks = int(max_rollbacks)
        self.rollback: int | None = None
        self.rollbacks = self.misses = self.unresolved = self.float64_fallbacks = 0
        self.extra_idx: np.ndarray | None = None        # (Q, E) rows of the previous pool kept after a rollback
        self.extra_contrib: np.ndarray | None = None
        self.w_hist: dict[int, np.ndarray] = {}
        self.kth_hist: dict[int, np.ndarray] = {}      # k-th selected pool score per query, per step
        self.final_rows: np.ndarray | None = None      # (Q, k) training rows of the last step's top-k
        self.final_contrib: np.ndarray | None = None   # (Q, k, M) float64, their contributions

    # ---- one step --------------------------------------------------------------------------------
    def select(self, w: np.ndarray, *, last: bool = False) -> np.ndarray | None:
        """Top-k positions (Q, k) into `candidates()` under `w`; None when the caller must roll back."""
        t, self.rollback = self.step, None
        self.w_hist[t] = w
        due = self.passes == 0 if self.complete else (last or t >= self.next or self.passes == 0)
        if due:
            miss = self.refresh_all(w)
            if miss is not None and self.rollbacks < self.max_rollbacks:
                self.rollbacks += 1
                self.interval = max(1, self.interval // 2)
                self.next = t + self.interval
                self.verified = self.step = self.rollback = miss
                return None
            self.unresolved += miss is not None
            if miss is None and self.passes > 1:
                self.interval = min(2 * self.interval, self.max_interval)
            self.next, self.verified = t + self.interval, t
        self.step = t + 1
        if last:
            return self.exact_final(w)
        scores = self.candidate_scores(w)
        pos = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        self.kth_hist[t] = np.take_along_axis(scores, pos, axis=1).min(axis=1)
        return pos

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows (Q, C'), contributions (Q, C', M)): the pool, plus the previous pool's rows after a rollback."""
        if self.extra_idx is None:
            return self.idx, self.contrib
        return (np.concatenate([self.idx, self.extra_idx], axis=1),
                np.concatenate([self.contrib, self.extra_contrib], axis=1))

    def candidate_scores(self, w: np.ndarray) -> np.ndarray:
        scores = self.pool_scores(w)
        if self.extra_idx is None:
            return scores
        extra = (self.extra_contrib.reshape(-1, self.extra_contrib.shape[-1]) @ w.astype(np.float32))
        extra = np.where(self.extra_idx >= 0, extra.reshape(self.extra_idx.shape), -np.inf)
        return np.concatenate([scores, extra], axis=1)

    def pool_scores(self, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        c = self.contrib if rows is None else self.contrib[rows]
        return (c.reshape(-1, c.shape[-1]) @ w.astype(np.float32)).reshape(c.shape[:2])

    # ---- refresh -----------------------------------------------------------------------------------
    def refresh_all(self, w: np.ndarray) -> int | None:
        """Rebuild every pool under `w` (one float32 pass) and check the steps since the last check.

        A miss: a row of the new pool that the step could not see (outside its candidates) scoring above
        the k-th score that step selected, beyond float32 rounding. Returns the first step with a miss
        (the previous pools' rows then stay candidates until the next refresh) or None.
        """
        n_q = len(self.t)
        rows = np.arange(n_q)
        take = min(self.size + 1, self.fitted.n_train)
        idx, top = top_pass(self.source, self.phi_q * np.repeat(w, self.widths), take)
        new = idx[:, : self.size]
        if self.complete:
            t = np.full(n_q, -np.inf)
        else:
            t = top[:, self.size].astype(np.float64) + self.eps_rel * (self.a @ w)
        seen = np.isfinite(self.t)
        contrib, _ = self._new_contributions(rows, new, reuse=seen)
        miss = self._first_miss(new, contrib) if seen.all() else None
        old_idx, old_contrib = self.idx.copy(), self.contrib.copy() if miss is not None else None
        self.contrib[:], self.idx[:], self.base_w[:], self.t[:] = contrib, new, w, t
        self.extra_idx = self.extra_contrib = None
        if miss is not None:   # keep the old pool's other rows as candidates for the replay
            keep = ~_isin_rows(old_idx, new)
            width = max(1, int(keep.sum(axis=1).max()))
            order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
            self.extra_idx = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(old_idx, order, 1), -1)
            self.extra_contrib = np.take_along_axis(old_contrib, order[:, :, None], axis=1)
        self.passes += 1
        self.queries_refreshed += n_q
        return miss

    def _first_miss(self, new: np.ndarray, contrib: np.ndarray) -> int | None:
        steps = [s for s in range(self.verified, self.step) if s in self.kth_hist]
        if not steps:
            return None
        seen_rows, _ = self.candidates()
        outside = ~_isin_rows(new, seen_rows)                         # (Q, C) new rows no step could see
        qi, ci = np.nonzero(outside)
        if len(qi) == 0:
            return None
        w = np.stack([self.w_hist[s] for s in steps], axis=1)          # (M, T)
        score = contrib[qi, ci].astype(np.float64) @ w                 # (P, T)
        kth = np.stack([self.kth_hist[s] for s in steps], axis=1)[qi]  # (P, T)
        err = (self.eps_rel * (self.a @ w))[qi]
        hit = score > kth + 2 * err
        self.misses += int(hit.any(axis=1).sum())
        cols = np.flatnonzero(hit.any(axis=0))
        return steps[int(cols[0])] if len(cols) else None

    # ---- the exact last step ----------------------------------------------------------------------
    def exact_final(self, w: np.ndarray) -> np.ndarray:
        """Top-k positions in the (just rebuilt) pools, certified equal to the float64 dense top-k.

        Sets `final_contrib` (Q, k, M) float64, the exact contributions of those rows. A query whose
        pool cannot be certified gets its top-k from a float64 pass over all rows, written into its pool.
        """
        n_q, k = len(self.t), self.k
        scores = self.pool_scores(w).astype(np.float64)   # the pools were just rebuilt: no extra rows
        err = self.eps_rel * (self.a @ w)                    # (Q,) float32 error of a pool or pass score
        part = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
        unsafe = np.flatnonzero(~(self.t < part - err))     # t already carries the pass's error
        for q in unsafe:
            self._float64_pool(int(q), w)
        if len(unsafe):
            scores[unsafe] = self.pool_scores(w, unsafe)
        pos = np.empty((n_q, k), dtype=np.int64)
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
        band = scores >= (kth - 2 * err)[:, None]           # every row that may be in the top-k
        for q in range(n_q):
            cand = np.flatnonzero(band[q])
            if len(cand) > k:
                exact = self._exact_contrib(q, self.idx[q, cand]) @ w
                order = sort_desc_then_index(exact[None], self.idx[q, cand][None])[0][:k]
                pos[q] = cand[order]
            else:
                pos[q] = cand
        rows = np.take_along_axis(self.idx, pos, axis=1)
        self.final_rows = rows
        self.final_contrib = np.stack([self._exact_contrib(q, rows[q]) for q in range(n_q)])
        return pos

    def _exact_contrib(self, q: int, train_rows: np.ndarray) -> np.ndarray:
        """(len(rows), M) float64 contributions of query q (float64 products of the stored features)."""
        order = np.argsort(train_rows)
        x = np.empty((len(train_rows), self.fitted.dim), dtype=np.float64)
        x[order] = self.fitted.psi[train_rows[order]]
        x *= self.phi_q[q]
        return np.add.reduceat(x, self.starts, axis=1)

    def _float64_pool(self, q: int, w: np.ndarray) -> None:
        """Query q's pool := its exact top-C under `w` from a float64 pass over all rows."""
        qw = self.phi_q[q] * np.repeat(w, np.diff(np.append(self.starts, self.fitted.dim)))
        running = RunningTopK(1, self.size)
        rows = effective_chunk_rows(65536, 8 * self.fitted.dim)
        for s, e in row_chunks(self.fitted.n_train, rows):
            running.update((np.asarray(self.fitted.psi[s:e], dtype=np.float64) @ qw)[None], s)
        idx, _ = running.result()
        self.idx[q] = idx[0]
        self.contrib[q] = self._exact_contrib(q, idx[0]).astype(np.float32)
        self.t[q] = -np.inf
        self.float64_fallbacks += 1


class LazyObjective:
    """Callable w (M,) float64 tensor -> mean_q L(w; q); exact at `last=True` (see module docstring)."""

    def __init__(self, fitted: FittedMethod, phi_q: np.ndarray, *, k: int, pool_size: int,
                 first_interval: int = FIRST_INTERVAL, max_interval: int = MAX_INTERVAL,
                 device: str | torch.device | None = None, progress: bool = False):
        self.device = pick_device(device)
        self.source = PsiSource(fitted.psi, self.device)
        start = time.perf_counter()
        self.stats = psi_stats_fast(self.source, fitted.group_slices, progress=progress)
        self.seconds = {"psi_gram": time.perf_counter() - start}
        start = time.perf_counter()
        self.grams = query_grams_fast(phi_q, self.stats.gram, fitted.group_slices)
        self.seconds["query_grams"] = time.perf_counter() - start
        self.pool = LazyPool(fitted, phi_q, self.stats, self.source, size=pool_size, k=k,
                             first_interval=first_interval, max_interval=max_interval)
        self.rows = np.arange(phi_q.shape[0])[:, None]

    def __call__(self, w: torch.Tensor, *, last: bool = False) -> torch.Tensor:
        pos = self.pool.select(w.detach().cpu().numpy().astype(np.float64), last=last)
        if pos is None:                       # the caller rolls back (`rollback`); the value is not used
            return torch.zeros((), dtype=w.dtype)
        if last:
            top = torch.from_numpy(self.pool.final_contrib)
        else:
            top = torch.from_numpy(self.pool.candidates()[1][self.rows, pos].astype(np.float64))   # (Q, k, M)
        signal = (top @ w).mean(dim=1)
        return ratio_loss(signal, QuadraticNorm.apply(w, self.grams))

    @property
    def rollback(self) -> int | None:
        """The step to resume from after the last call, or None (see `LazyPool`)."""
        return self.pool.rollback

    def memory_bytes(self) -> int:
        """Bytes held by the pool contributions, G and S (the dominant terms)."""
        return int(self.pool.contrib.nbytes + self.grams.nbytes + self.stats.gram.nbytes)

    def pool_info(self) -> dict:
        p = self.pool
        return {"size": p.size, "refresh": "lazy", "passes": p.passes, "queries_refreshed": p.queries_refreshed,
                "interval_max": p.max_interval, "misses_found": p.misses, "rollbacks": p.rollbacks,
                "misses_not_undone": p.unresolved, "float64_fallbacks": p.float64_fallbacks,
                "device": str(self.device)}


def _isin_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row r: a[r] ∈ b[r] elementwise ((Q, p), (Q, c) non-negative ints, −1 entries in b ignored)."""
    base = (np.arange(a.shape[0], dtype=np.int64) * (max(int(a.max(initial=0)), int(b.max(initial=0))) + 2))[:, None]
    keys = np.sort((b + 1 + base).ravel())
    probe = (a + 1 + base).ravel()
    at = np.minimum(np.searchsorted(keys, probe), keys.size - 1)
    return (keys[at] == probe).reshape(a.shape)
