"""How long after a pool refresh can a bound prove that the top-k is still inside the pools?

    .venv/bin/python bench/bench_weights_certificate.py

Planted problem N = 25,000, k = 2,048 features, M = 200 (bench_weights_scale's SCALE at a quarter of the
rows), the first 100 learning queries, pool C = 256, top-k 10. The weights are the lazy learner's own
trajectory. For refreshes at steps 0 and 32 and t steps later, the fraction of queries for which
- today's bound (`CandidatePool.bound`, refresh="exact") is below the k-th pool score,
- a perfect move bound is: t_q + max_{n ∉ pool} (τ_{w_t}(q, n) − τ_{w_r}(q, n)) < k-th pool score (the best
  any bound from the refresh's scores and a bound on how far each row moved can do),
- the true top-k is still inside the pool (float64 scores of every row).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from common import PLANTED_SCALE, write_planted
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights import lazy, learn_weights
from gradtrace.weights.pool import CandidatePool


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_planted(Path(tmp), dict(PLANTED_SCALE, n_train=25_000, n_queries=250))
        psi = np.load(Path(tmp) / "psi.npy")
        slices = json.loads((Path(tmp) / "slices.json").read_text())
        q = np.load(Path(tmp) / "queries.npy")[:100].astype(np.float64)
    fitted = FittedMethod(psi=psi, group_slices=slices, info={})
    seen = []
    init = lazy.LazyObjective.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self)

    lazy.LazyObjective.__init__ = record
    learn_weights(fitted, q, progress=False, memory_budget_bytes=1)
    pool = seen[0].pool
    w_hist = np.stack([pool.w_hist[t] for t in range(201)])
    widths = np.diff([s for _, s, _ in slices] + [psi.shape[1]])
    x = psi.astype(np.float64)
    c, k = 256, 10
    print("| refresh at step | steps after | today's bound proves | a perfect move bound proves "
          "| true top-k inside the pool |")
    print("|---|---|---|---|---|")
    for r in (0, 32):
        base = (q * np.repeat(w_hist[r], widths)) @ x.T
        order = np.argsort(-base, axis=1)
        inside = np.zeros_like(base, dtype=bool)
        np.put_along_axis(inside, order[:, :c], True, axis=1)
        t_r = np.take_along_axis(base, order[:, c:c + 1], axis=1)[:, 0]
        today = CandidatePool(fitted, q, seen[0].stats, size=c, k=k, trigger="exact")
        today.refresh(np.arange(len(q)), w_hist[r])
        for t in (1, 2, 4, 8, 16, 32):
            s = (q * np.repeat(w_hist[r + t], widths)) @ x.T
            kth = -np.partition(-np.where(inside, s, -np.inf), k - 1, axis=1)[:, k - 1]
            move = np.where(inside, -np.inf, s - base).max(axis=1)
            held = np.take_along_axis(inside, np.argsort(-s, axis=1)[:, :k], axis=1).all(axis=1)
            print(f"| {r} | {t} | {(today.bound(w_hist[r + t]) < kth).mean():.2f} | {(t_r + move < kth).mean():.2f} | "
                  f"{held.mean():.2f} |", flush=True)


if __name__ == "__main__":
    main()
