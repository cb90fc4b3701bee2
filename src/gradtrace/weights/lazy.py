"""The default scalable SNR objective: float32 kernels, scheduled pool refreshes with rollback, exact end.

Same objective as `snr_loss` on the dense contributions, never building Q × N × M:

- noise: ‖τ_w(q, ·)‖² = wᵀ G_q w with G_q from S = ΨᵀΨ, computed once (`kernels`: float32 products
  summed in float64 per chunk; on CPU numpy's symmetric rank-k update) and stored in float32. Per step
  one (Q·M, M) product summed in float64 (`noise.GramNorm`), no pass over Ψ.
- signal: the top-k of each query among its candidates: its pool (top-C rows at its last refresh, with
  their per-group contributions in float32, as in `pool`). A step scores only a shortlist of each
  query's best 4k candidates, in float64 (`shortlist`: the rest are checked every few steps and before
  each refresh; a candidate that beat a step's k-th score rolls the steps back like a pool miss). Pools
  are rebuilt by a streamed float32 pass (`psi_passes.top_pass`, on the GPU when present) at step 0,
  after `first_interval` steps, then every `max_interval` steps (rounded up to multiples of half of
  it, so that queries share passes), and at the last step: with the defaults 32 and 256 and 200 steps,
  at steps 0, 32 and 200. A pass costs as much as hundreds of steps, so misses are caught late and
  undone by replaying steps rather than by more passes.
- misses are undone: at a refresh, each new-pool row the query could not see is scored at every step
  since the query's last check (the weights and the k-th selected score of each step are kept). A row
  above that step's k-th score is a miss: the step's top-k was wrong. The caller then rolls θ and the
  optimizer back to the first missed step (`rollback`) and replays with the old and new pools as
  candidates, so every miss that reaches a refresh's pool is undone and the trajectory is the dense
  path's. Scores are compared as the steps compute them (float64 products of the float32
  contributions; float32 products first, and those within their rounding again in float64). Not
  checked: a row that enters a query's top-k and falls out of its top-C again between two refreshes
  (`refresh="exact"` proves every step instead, at many more passes).
- the last step (the returned weights): every query is refreshed, its pool is certified to hold the
  top-k (the (C+1)-th pass score plus its float32 error bound is below the k-th pool score minus its
  error bound; otherwise that query gets a float64 pass over all rows), ties within the float32 error
  are resolved in float64 (lower row index first), and the top-k rows' contributions are recomputed
  in float64. So the final top-k is the dense path's and `final_loss` is the objective at the
  returned weights.

Rows: every pass over Ψ (ΨᵀΨ, the pool passes, contributions of new pool rows, the float64 passes and contributions
of the last step) goes through a `row_source.RowSource`: one process's rows, or a torchrun rank's with each result
merged over the ranks, so that every rank holds the same pools and takes the same steps.

Threads: the steps are small, memory-bound products where a second thread only contends (and, on a
shared machine, multiplies the CPU time), so the learner runs them on one thread; the passes and ΨᵀΨ
use the threads torch was configured with.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.topk import sort_desc_then_index
from gradtrace.weights.noise import GramNorm
from gradtrace.weights.objective import ratio_loss
from gradtrace.weights.pool import CandidatePool
from gradtrace.weights.psi_passes import U32, query_grams_fast
from gradtrace.weights.row_source import RowSource
from gradtrace.weights.shortlist import Shortlist
from gradtrace.weights.threads import threads

FIRST_INTERVAL = 32
MAX_INTERVAL = 256
MAX_ROLLBACKS = 32


class LazyPool(CandidatePool):
    """Candidate pools refreshed on a per-query schedule, misses found at refreshes undone, exact last step.

    After `select`, `rollback` is None or the step the caller must resume from (restoring θ and the
    optimizer as they were before that step); the pools have then already taken in the missed rows.
    """

    def __init__(self, fitted: FittedMethod, phi_q: np.ndarray, stats, rows: RowSource, *, size: int, k: int,
                 first_interval: int | None = None, max_interval: int | None = None,
                 max_rollbacks: int = MAX_ROLLBACKS, shortlist: int | None = None,
                 shortlist_interval: int | None = None):
        super().__init__(fitted, phi_q, stats, size=size, k=k, trigger="lazy", rows=rows)
        n_q = len(phi_q)
        self.pass_threads = torch.get_num_threads()
        self.shortlist = Shortlist(self, size=shortlist, interval=shortlist_interval)
        self.widths = np.diff(np.append(self.starts, fitted.dim))
        self.interval = np.full(n_q, int(first_interval or FIRST_INTERVAL), dtype=np.int64)
        self.max_interval = int(max_interval or MAX_INTERVAL)
        self.next = np.zeros(n_q, dtype=np.int64)        # step of the query's next refresh
        self.verified = np.zeros(n_q, dtype=np.int64)    # steps before this were checked at a refresh
        self.max_rollbacks = int(max_rollbacks)
        self.rollback: int | None = None
        self.rollbacks = self.misses = self.unresolved = self.float64_fallbacks = 0
        self.extra_idx = np.full((n_q, 0), -1, dtype=np.int64)   # old pool rows kept after a rollback (−1: none)
        self.extra_contrib = np.zeros((n_q, 0, fitted.n_groups), dtype=np.float32)
        self.w_hist: dict[int, np.ndarray] = {}
        self.kth_hist: dict[int, np.ndarray] = {}      # k-th selected candidate score per query, per step
        self.final_rows: np.ndarray | None = None      # (Q, k) training rows of the last step's top-k
        self.final_contrib: np.ndarray | None = None   # (Q, k, M) float64, their contributions

    # ---- one step --------------------------------------------------------------------------------
    def select(self, w: np.ndarray, *, last: bool = False) -> np.ndarray | None:
        """Top-k positions (Q, k) into the shortlist under `w` (into the pool when `last`); None when the
        caller must roll back."""
        t, self.rollback = self.step, None
        self.w_hist[t] = w
        n_q = len(self.t)
        if self.complete:
            due = np.arange(n_q) if self.passes == 0 else np.empty(0, dtype=np.int64)
        else:
            due = np.arange(n_q) if (last or self.passes == 0) else np.flatnonzero(self.next <= t)
        short = self.shortlist
        if short.pos is not None and (len(due) or short.due(t)):
            miss = short.check(t, w)
            if miss is not None:
                return self._roll_back(miss)
        if len(due):
            miss = self.refresh(due, w)
            short.reset()                            # the candidates changed
            if miss is not None and self.rollbacks < self.max_rollbacks:
                self.rollbacks += 1
                return self._roll_back(miss)
            self.unresolved += miss is not None
        self.step = t + 1
        if last:
            return self.exact_final(w)
        if short.pos is None or short.due(t):
            short.choose(w, t)
        pos, self.kth_hist[t] = short.select(w, self.k)
        return pos

    def _roll_back(self, step: int) -> None:
        """Resume from `step`: its steps are redone, the shortlist is chosen anew there."""
        self.verified = np.minimum(self.verified, step)
        self.shortlist.reset()
        self.step = self.rollback = step
        return None

    def candidate_rows(self) -> np.ndarray:
        """(Q, C') training rows of the candidates: the pool, then old pool rows kept after a rollback (−1: none)."""
        if self.extra_idx.shape[1] == 0:
            return self.idx
        return np.concatenate([self.idx, self.extra_idx], axis=1)

    def candidate_scores(self, w: np.ndarray) -> np.ndarray:
        """(T, Q, C') float32 scores of all candidates under the columns of `w` (M, T); −inf for no row."""
        wt = np.ascontiguousarray(w.T, dtype=np.float32)                  # (T, M)
        n_q, m, n_w = len(self.t), w.shape[0], w.shape[1]
        parts = [(wt @ self.contrib.reshape(-1, m).T).reshape(n_w, n_q, -1)]
        if self.extra_idx.shape[1]:
            extra = (wt @ self.extra_contrib.reshape(-1, m).T).reshape(n_w, n_q, -1)
            extra[:, self.extra_idx < 0] = -np.inf
            parts.append(extra)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)

    def candidate_contrib(self, pos: np.ndarray) -> np.ndarray:
        """Contributions (Q, p, M) float32 of the candidates at positions `pos` (Q, p)."""
        return self.candidate_contrib_at(np.repeat(np.arange(len(pos)), pos.shape[1]), pos.ravel()).reshape(
            pos.shape + (self.contrib.shape[2],))

    def candidate_contrib_at(self, qi: np.ndarray, ci: np.ndarray) -> np.ndarray:
        """(P, M) float32 contributions of candidates (query qi, position ci)."""
        c = self.size
        out = self.contrib[qi, np.minimum(ci, c - 1)]
        extra = ci >= c
        if extra.any():
            out[extra] = self.extra_contrib[qi[extra], ci[extra] - c]
        return out

    def tie_tolerance(self, scale: np.ndarray) -> np.ndarray:
        """Float64 rounding of a score (different summation orders): scores closer than this are tied."""
        return 8 * (self.fitted.n_groups + 2) * 2.0 ** -53 * scale

    # ---- refresh -----------------------------------------------------------------------------------
    def refresh(self, rows: np.ndarray, w: np.ndarray) -> int | None:
        """Rebuild the pools of queries `rows` under `w` (one float32 pass) and check their steps since
        their last check. Returns the first step with a miss (then those queries keep their old pool's
        rows as extra candidates until their next refresh) or None.

        A miss: a row of the new pool that the query's step could not see (outside its candidates)
        scoring above the k-th score that step selected (both float64 products of float32 contributions).
        """
        take = min(self.size + 1, self.rows.n)
        with threads(self.pass_threads):
            idx, top = self.rows.top(self.phi_q[rows] * np.repeat(w, self.widths), take)
        new = idx[:, : self.size]
        if self.complete:
            t = np.full(len(rows), -np.inf)
        else:
            t = top[:, self.size].astype(np.float64) + self.eps_rel * (self.a[rows] @ w)
        seen = np.isfinite(self.t[rows])
        contrib, _ = self._new_contributions(rows, new, reuse=seen)
        missed = self._first_miss(rows, new, contrib, self.step)     # (len(rows),) first missed step or −1
        hit = missed >= 0
        rolling = hit.any() and self.rollbacks < self.max_rollbacks
        old_idx, old_contrib = self.idx[rows], (self.contrib[rows] if rolling else None)
        if len(rows) == len(self.t):                                    # every query: no copy
            self.contrib = contrib
        else:
            self.contrib[rows] = contrib
        self.idx[rows], self.base_w[rows], self.t[rows] = new, w, t
        self.passes += 1
        self.queries_refreshed += len(rows)
        self.misses += int(hit.sum())
        # after the first interval the long one, misses or not: a pass costs as much as hundreds of replayed steps
        grow = np.where(seen, self.max_interval, self.interval[rows])
        self.interval[rows] = grow
        half = np.maximum(1, grow // 2)       # rounded up to half-interval multiples, so that queries share passes
        self.next[rows] = -(-(self.step + grow) // half) * half
        if not rolling:
            self.verified[rows] = self.step
            self._set_extras(rows, np.full((len(rows), 0), -1, dtype=np.int64), None)
            return None if not hit.any() else int(missed[hit].min())
        # rolling back: these queries replay with their old pool's rows as extra candidates
        keep = ~_isin_rows(old_idx, new)
        self._set_extras(rows, np.where(keep, old_idx, -1), old_contrib)
        return int(missed[hit].min())

    def _set_extras(self, rows: np.ndarray, extra_idx: np.ndarray, extra_contrib: np.ndarray | None) -> None:
        """Replace the extra candidates of `rows`; columns stay packed to the widest query."""
        all_idx, all_contrib = self.extra_idx, self.extra_contrib
        width = max(all_idx.shape[1], extra_idx.shape[1])
        pad_idx = np.full((len(self.t), width), -1, dtype=np.int64)
        pad_contrib = np.zeros((len(self.t), width, all_contrib.shape[2]), dtype=np.float32)
        pad_idx[:, : all_idx.shape[1]], pad_contrib[:, : all_idx.shape[1]] = all_idx, all_contrib
        pad_idx[rows] = -1
        pad_idx[rows, : extra_idx.shape[1]] = extra_idx
        if extra_contrib is not None:
            pad_contrib[rows, : extra_idx.shape[1]] = extra_contrib
        valid = pad_idx >= 0
        width = int(valid.sum(axis=1).max(initial=0))
        order = np.argsort(~valid, axis=1, kind="stable")[:, :width]
        self.extra_idx = np.take_along_axis(pad_idx, order, axis=1)
        self.extra_contrib = np.take_along_axis(pad_contrib, order[:, :, None], axis=1)

    def _first_miss(self, rows: np.ndarray, new: np.ndarray, contrib: np.ndarray, now: int) -> np.ndarray:
        out = np.full(len(rows), -1, dtype=np.int64)
        start = int(self.verified[rows].min(initial=now))
        steps = [s for s in range(start, now) if s in self.kth_hist]
        if not steps:
            return out
        outside = ~_isin_rows(new, self.candidate_rows()[rows])        # new pool rows the steps could not see
        qi, ci = np.nonzero(outside)
        if len(qi) == 0:
            return out
        w = np.stack([self.w_hist[s] for s in steps], axis=1)          # (M, T)
        c32 = contrib[qi, ci]
        kth = np.stack([self.kth_hist[s][rows] for s in steps], axis=1)[qi]
        scale = (self.a[rows] @ w)[qi]                                 # (P, T) ≥ Σ_j w_j |c_j|
        # float32 scores first; those within their rounding of the k-th score again in float64
        near = (c32 @ w.astype(np.float32) > kth - 2 * (len(w) + 2) * U32 * scale).any(axis=1)
        score = np.full(kth.shape, -np.inf)
        score[near] = c32[near].astype(np.float64) @ w                 # (P, T), as the steps score
        since = np.array(steps)[None, :] >= self.verified[rows][qi][:, None]
        hit = (score > kth + self.tie_tolerance(scale)) & since
        first = np.where(hit.any(axis=1), np.argmax(hit, axis=1), len(steps))
        per_query = np.full(len(rows), len(steps))
        np.minimum.at(per_query, qi, first)
        found = per_query < len(steps)
        out[found] = np.array(steps)[per_query[found]]
        return out

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
        if len(unsafe):
            self._float64_pools(unsafe, w)
            scores[unsafe] = self.pool_scores(w, unsafe)
        pos = np.empty((n_q, k), dtype=np.int64)
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
        band = scores >= (kth - 2 * err)[:, None]           # every row that may be in the top-k
        cands = [np.flatnonzero(band[q]) for q in range(n_q)]
        tied = [q for q in range(n_q) if len(cands[q]) > k]
        exact = self._exact_contrib(np.repeat(tied, [len(cands[q]) for q in tied]).astype(np.int64),
                                    np.concatenate([self.idx[q, cands[q]] for q in tied] or [[]]).astype(np.int64)) @ w
        at = 0
        for q in range(n_q):
            cand = cands[q]
            if len(cand) > k:
                rows = self.idx[q, cand]
                order = sort_desc_then_index(exact[None, at:at + len(cand)], rows[None])[0][:k]
                at += len(cand)
                pos[q] = cand[order]
            else:
                pos[q] = cand
        rows = np.take_along_axis(self.idx, pos, axis=1)
        self.final_rows = rows
        self.final_contrib = self._exact_contrib(np.repeat(np.arange(n_q), k), rows.ravel()).reshape(n_q, k, -1)
        return pos

    def _exact_contrib(self, queries: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
        """(P, M) float64 contributions of the pairs (queries[i], train_rows[i]) (float64 products of the stored
        features)."""
        return self.rows.contributions(self.phi_q, queries, train_rows)

    def _float64_pools(self, queries: np.ndarray, w: np.ndarray) -> None:
        """The pools of `queries` := their exact top-C under `w` from one float64 pass over all rows."""
        qw = self.phi_q[queries] * np.repeat(w, np.diff(np.append(self.starts, self.fitted.dim)))
        idx, _ = self.rows.top64(qw, self.size)
        self.idx[queries] = idx
        self.contrib[queries] = self._exact_contrib(np.repeat(queries, idx.shape[1]), idx.ravel()).astype(
            np.float32).reshape(len(queries), idx.shape[1], -1)
        self.t[queries] = -np.inf
        self.float64_fallbacks += len(queries)


class LazyObjective:
    """Callable w (M,) float64 tensor -> mean_q L(w; q) (each L(w; q) with `per_query=True`); exact at `last=True`
    (see module docstring)."""

    def __init__(self, fitted: FittedMethod, phi_q: np.ndarray, *, k: int, pool_size: int,
                 first_interval: int | None = None, max_interval: int | None = None,
                 device: str | torch.device | None = None, progress: bool = False, rows: RowSource | None = None):
        self.rows = RowSource(fitted, device=device) if rows is None else rows   # one process's rows, or a rank's
        self.device = self.rows.device
        start = time.perf_counter()
        self.stats = self.rows.stats(progress=progress)
        self.seconds = {"psi_gram": time.perf_counter() - start}
        start = time.perf_counter()
        self.grams = torch.from_numpy(query_grams_fast(phi_q, self.stats.gram, fitted.group_slices))
        self.seconds["query_grams"] = time.perf_counter() - start
        self.pool = LazyPool(fitted, phi_q, self.stats, self.rows, size=pool_size, k=k,
                             first_interval=first_interval, max_interval=max_interval)

    step_threads = 1   # the steps are small, memory-bound work where threads only contend; passes lift this

    def __call__(self, w: torch.Tensor, *, last: bool = False, per_query: bool = False) -> torch.Tensor:
        pos = self.pool.select(w.detach().cpu().numpy().astype(np.float64), last=last)
        if pos is None:                       # the caller rolls back (`rollback`); the value is not used
            return torch.zeros((), dtype=w.dtype)
        top = self.pool.final_contrib if last else self.pool.shortlist.gather(pos)          # (Q, k, M)
        mean_top = torch.from_numpy(top.mean(axis=1, dtype=np.float64))            # (Q, M)
        return ratio_loss(mean_top @ w, GramNorm.apply(w, self.grams), per_query=per_query)

    @property
    def rollback(self) -> int | None:
        """The step to resume from after the last call, or None (see `LazyPool`)."""
        return self.pool.rollback

    def memory_bytes(self) -> int:
        """Bytes held by the pool contributions, G and S (the dominant terms)."""
        return int(self.pool.contrib.nbytes + self.grams.numel() * 4 + self.stats.gram.nbytes)

    def pool_info(self) -> dict:
        p = self.pool
        return {"size": p.size, "refresh": "lazy", "passes": p.passes, "queries_refreshed": p.queries_refreshed,
                "interval_max": p.max_interval, "misses_found": p.misses, "rollbacks": p.rollbacks,
                "shortlist": p.shortlist.size, "shortlist_misses": p.shortlist.misses,
                "shortlist_rollbacks": p.shortlist.rollbacks, "shortlist_unresolved": p.shortlist.unresolved,
                "misses_not_undone": p.unresolved, "float64_fallbacks": p.float64_fallbacks,
                "device": str(self.device)}


def _isin_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row r: a[r] ∈ b[r] elementwise ((Q, p), (Q, c) non-negative ints, −1 entries in b ignored)."""
    base = (np.arange(a.shape[0], dtype=np.int64) * (max(int(a.max(initial=0)), int(b.max(initial=0))) + 2))[:, None]
    keys = np.sort((b + 1 + base).ravel())
    probe = (a + 1 + base).ravel()
    at = np.minimum(np.searchsorted(keys, probe), keys.size - 1)
    return (keys[at] == probe).reshape(a.shape)
