"""The per-step candidates of the lazy learner: a shortlist of each query's best pool rows, checked later.

A step needs the top-k of each query among its candidates (its pool of C rows, plus old pool rows kept
after a rollback). Scoring all C every step reads the (Q, C, M) pool contributions each time; instead
each query keeps a shortlist of s = 4k candidates (its top-k and its best under the weights of one step
and under those weights extrapolated to the next check, their contributions copied in float64), and a
step scores only those, in float64. Every few steps (8, halved after a miss down to 2, doubled after a
clean check) and before every pool refresh, the candidates outside the shortlist are scored at every
step since the shortlist was chosen, in one float32 product (M × T weights against the whole pool), and those within
float32 rounding of a step's k-th score again in float64. A candidate above a step's k-th score is a miss: the caller
rolls back to that step (as for a pool miss, `lazy.LazyPool`), where the shortlist is chosen anew. So every step
selects the top-k of all its candidates, scored in float64 from their float32 contributions, as if it had scored the
pool.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.weights.psi_passes import U32

PER_K = 4          # shortlist size: 4k candidates per query
MIN_INTERVAL = 2   # steps between checks: halved after a miss down to this, doubled after a clean check ...
MAX_INTERVAL = 8   # ... up to this


class Shortlist:
    """The shortlist of every query (positions into `pool`'s candidates) and its check."""

    def __init__(self, pool, *, size: int | None = None, interval: int | None = None):
        self.pool = pool
        self.size = max(pool.k, min(int(size or PER_K * pool.k), pool.size))
        self.max_interval = int(interval or MAX_INTERVAL)
        self.interval = self.max_interval
        self.pos: np.ndarray | None = None          # (Q, s) positions into the candidates; None: choose anew
        self.contrib: torch.Tensor | None = None    # (Q, s, M) float64, their contributions
        self.chosen = self.next = 0                 # step it was chosen at (checked from there), next check
        self.ahead: tuple[int, np.ndarray] | None = None   # (step, candidate scores) kept from the last check
        self.misses = self.rollbacks = self.unresolved = 0

    def due(self, t: int) -> bool:
        return self.pos is not None and t >= self.next

    def reset(self) -> None:
        """The candidates changed (or the steps are redone): choose anew at the next step."""
        self.pos, self.ahead = None, None

    def choose(self, w: np.ndarray, t: int) -> None:
        """The `size` candidates of each query ranked best under `w` (the weights of step t), its top-k
        first, or under the weights extrapolated to the next check (log w moving on as in the last step)."""
        if self.ahead is not None and self.ahead[0] == t:
            scores = self.ahead[1]
        else:
            scores = self.pool.candidate_scores(w[:, None])[0]
        self.ahead = None
        s = self.size
        prev = self.pool.w_hist.get(t - 1)
        if prev is not None and s < scores.shape[1]:
            log_w = np.log(np.maximum(w, 1e-300))
            la = log_w + self.interval * (log_w - np.log(np.maximum(prev, 1e-300)))
            ahead = np.exp(la - la.max())
            ahead /= ahead.sum()
            later = self.pool.candidate_scores(ahead[:, None])[0]
            rank_now = np.argsort(np.argsort(-scores, axis=1), axis=1)
            rank_later = np.argsort(np.argsort(-later, axis=1), axis=1)
            key = 2 * np.minimum(rank_now, rank_later) + (rank_now > rank_later)
            key[rank_now < self.pool.k] = -1                # the step's own top-k always
            self.pos = np.argpartition(key, s - 1, axis=1)[:, :s]
        else:
            self.pos = (np.argpartition(-scores, s - 1, axis=1)[:, :s] if s < scores.shape[1]
                        else np.broadcast_to(np.arange(s), scores.shape).copy())
        self.contrib = torch.from_numpy(self.pool.candidate_contrib(self.pos).astype(np.float64))
        self.chosen, self.next = t, t + self.interval

    def select(self, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(top-k positions (Q, k) into the shortlist, k-th score (Q,) float64) under `w`."""
        scores = (self.contrib.view(-1, len(w)) @ torch.from_numpy(w)).view(self.contrib.shape[0], -1)
        top, pos = torch.topk(scores, k, dim=1, sorted=False)
        return pos.numpy(), top.min(dim=1).values.numpy()

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """Contributions (Q, k, M) float64 of the shortlist entries at positions `pos` (Q, k)."""
        return self.contrib.numpy()[np.arange(len(pos))[:, None], pos]

    def check(self, now: int, w_now: np.ndarray) -> int | None:
        """The step to roll back to, or None: the first step in [chosen, now) at which a candidate outside
        the shortlist scored above the k-th selected score. Adjusts the interval to the next check; the
        candidates' scores under `w_now` (step `now`) are kept for `choose`."""
        miss = self._first_miss(now, w_now)
        if miss is not None and miss == self.chosen:   # only float32 ties at the shortlist's edge: no progress
            self.unresolved += 1
            miss = None
        if miss is None:
            self.interval = min(self.max_interval, 2 * self.interval)
            return None
        self.rollbacks += 1
        self.interval = max(MIN_INTERVAL, self.interval // 2)
        self.reset()
        return miss

    def _first_miss(self, now: int, w_now: np.ndarray) -> int | None:
        p = self.pool
        steps = np.arange(self.chosen, now)
        if not len(steps) or self.size >= p.size + p.extra_idx.shape[1]:
            return None
        w = np.stack([p.w_hist[s] for s in steps], axis=1)                     # (M, T)
        scores = p.candidate_scores(np.concatenate([w, w_now[:, None]], axis=1))  # (T + 1, Q, C') float32
        self.ahead = (now, scores[-1].copy())
        scores = scores[:-1]
        np.put_along_axis(scores, np.broadcast_to(self.pos, (len(steps),) + self.pos.shape), -np.inf, axis=2)
        kth = np.stack([p.kth_hist[s] for s in steps])                           # (T, Q) float64
        scale = w.T @ p.a.T                                                      # (T, Q) ≥ Σ_j w_j |c_j|
        ti, qi, ci = np.nonzero(scores > (kth - 2 * (len(w) + 2) * U32 * scale)[:, :, None])
        if not len(ti):
            return None
        exact = np.einsum("pm,mp->p", p.candidate_contrib_at(qi, ci).astype(np.float64), w[:, ti])
        hit = exact > kth[ti, qi] + p.tie_tolerance(scale[ti, qi])
        if not hit.any():
            return None
        self.misses += int(hit.sum())
        return int(steps[ti[hit].min()])
