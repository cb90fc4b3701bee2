"""Planted synthetic problems: one group carries a sparse per-query signal, the others only noise.

For query q a few training rows P(q) (different rows for different queries) get, in the signal group s,
ψ_s(n) = background + strength · φ_s(q)/‖φ_s(q)‖, so c_s(q, n) ≈ strength·‖φ_s(q)‖ stands out from
the background c_s ~ N(0, (background·‖φ_s(q)‖)²). Every other group is Gaussian noise with a larger
scale, so with uniform weights the planted rows drown; a learner that finds group s recovers them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.rows import allocate_psi, finish_psi, row_chunks


@dataclass
class PlantedProblem:
    fitted: FittedMethod
    queries: np.ndarray        # (Q, dim) float32 query features
    planted: np.ndarray        # (Q, n_planted) int64 planted training rows per query
    signal_group: int


def even_slices(dim: int, n_groups: int, *, first: int | None = None) -> list[tuple[str, int, int]]:
    """`n_groups` contiguous groups over `dim` columns, sizes as even as possible (group 0 may be set)."""
    sizes = []
    rest_dim, rest_groups = dim, n_groups
    if first is not None:
        sizes.append(first)
        rest_dim, rest_groups = dim - first, n_groups - 1
    base, extra = divmod(rest_dim, rest_groups)
    sizes += [base + (1 if i < extra else 0) for i in range(rest_groups)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(f"g{j:03d}", int(bounds[j]), int(bounds[j + 1])) for j in range(n_groups)]


def planted_problem(n_train: int, n_queries: int, n_groups: int, dim: int, *, signal_dim: int | None = None,
                    n_planted: int = 5, strength: float = 6.0, background: float = 1.0, noise: float = 2.0,
                    seed: int = 0, psi_path: str | os.PathLike | None = None,
                    chunk_rows: int = 8192) -> PlantedProblem:
    """A FittedMethod (Ψ given directly) plus queries with a planted signal in group 0.

    `signal_dim` sets the width of the signal group (default: an even split). Ψ is written in row
    chunks (to a .npy memmap at `psi_path` when given). Deterministic for `seed`.
    """
    rng = np.random.default_rng(seed)
    slices = even_slices(dim, n_groups, first=signal_dim)
    s0, s1 = slices[0][1], slices[0][2]
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    chosen = rng.choice(n_train, size=n_queries * n_planted, replace=False)
    planted = chosen.reshape(n_queries, n_planted).astype(np.int64)
    owner = np.full(n_train, -1, dtype=np.int64)
    owner[chosen] = np.repeat(np.arange(n_queries), n_planted)
    direction = queries[:, s0:s1] / np.linalg.norm(queries[:, s0:s1], axis=1, keepdims=True)
    scale = np.full(dim, noise, dtype=np.float32)
    scale[s0:s1] = background
    psi = allocate_psi(n_train, dim, psi_path)
    for start, stop in row_chunks(n_train, chunk_rows):
        block = rng.standard_normal((stop - start, dim), dtype=np.float32) * scale
        own = owner[start:stop]
        hit = own >= 0
        block[hit, s0:s1] += strength * direction[own[hit]]
        psi[start:stop] = block
    fitted = FittedMethod(psi=finish_psi(psi), group_slices=slices, info={"method": "planted", "seed": seed})
    return PlantedProblem(fitted=fitted, queries=queries, planted=planted, signal_group=0)


def planted_recall(fitted: FittedMethod, queries: np.ndarray, planted: np.ndarray, weights: np.ndarray | None,
                   k: int) -> float:
    """Fraction of planted rows found in each query's top-k under `weights`, averaged over queries."""
    idx, _ = fitted.topk(queries, k, weights=weights)
    hits = [np.isin(p, row).sum() for p, row in zip(planted, idx)]
    return float(np.sum(hits) / planted.size)
