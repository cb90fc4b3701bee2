"""The λ scale of group weights that act inside the shared kernel, chosen label-free by the family criterion.

Weights inside the shared TRAK kernel (`gradtrace.methods.trak`): K_w(c) = D (D G D + λ I)⁻¹ D with G = ΦᵀΦ,
D = diag(√w) over each group's columns and λ = c · mean diag(D G D). The weights damp or lift groups only through λ:
as c → 0 the inverse whitens the scaling away, as c → ∞ K_w tends to W / λ (a weighted gradient inner product).
So the c that suits the weights is not the c of uniform weights, and it is chosen with them, on the learning
queries, by the criterion the weights were learned for: the family criterion (`gradtrace.weights.family`),
within-family minus across-family agreement of the top-k.

One eigendecomposition serves every c of the grid:
- primal (k columns ≤ the dual rule's bound): D G D = V Λ Vᵀ and τ_c(q, ·) = (φ_q D V) diag(1 / (Λ + λ)) (D V)ᵀ Φᵀ;
- dual (k > N, `gradtrace.methods.trak.uses_dual`): Φ W Φᵀ = U Σ Uᵀ and τ_c(q, ·) = (φ_q W Φᵀ U) diag(1 / (Σ + λ)) Uᵀ
  (the push-through identity);
each column n times the store's row factor e_n where the method has one (DAS).

On the text-to-image aspects benchmark (five builds, 30 shared-kernel cases) the criterion chose c = 10 to 1e6 where
the general weights' c was 1, and the family weights beat uniform on their own aspect in 26 of 30 cases, none worse,
against 16 of 30 at the general weights' c (docs/benchmarks.md, "The shared kernel's c for inside weights").
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from gradtrace.errors import UserError
from gradtrace.methods.checks import check_group_slices, check_matrix, check_train_matrix, raise_if_nonfinite
from gradtrace.methods.rows import row_chunks
from gradtrace.methods.trak import accumulate_gram, spread_over_columns, uses_dual
from gradtrace.weights.family import family_signal

# 1e-4 .. 1e6 in half decades. Its top is near the limit K_w -> W / λ: the largest eigenvalue of D G D is at most its
# trace, k · mean diag, so at c = 1e6 it is at most k / 1e6 of λ (1% for k = 10,000 columns)
INSIDE_GRID = tuple(float(10.0 ** e) for e in np.arange(-4.0, 6.01, 0.5))


def column_weights(weights: Any, group_slices: list[tuple[str, int, int]], k: int) -> np.ndarray:
    """(k,) w_j on group j's columns, for (M,) weights in the order of `group_slices`."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if len(w) != len(group_slices) or not np.all(np.isfinite(w)) or (w < 0).any() or not w.any():
        raise UserError(f"inside weights need {len(group_slices)} finite non-negative values, not all zero "
                        f"(got {len(w)})")
    return spread_over_columns(w, group_slices, k)


def inside_scores(train_features: Any, group_slices: Any, weights: Any, query_features: Any, grid: Any, *,
                  row_scale: Any = None, gram: np.ndarray | None = None,
                  chunk_rows: int = 65536) -> Iterator[tuple[float, np.ndarray]]:
    """(c, (Q, N) scores of the queries with the weights inside the shared kernel at c) for each c of `grid`, from
    one eigendecomposition (module docstring). `gram`: G = ΦᵀΦ (k × k) when already at hand (primal form only)."""
    phi = check_train_matrix(train_features)
    n, k = phi.shape
    slices = check_group_slices(group_slices, k)
    q = np.asarray(check_matrix(query_features, "learning query features", k), dtype=np.float64)
    raise_if_nonfinite(q, 0, "learning query features")
    col_w = column_weights(weights, slices, k)
    scale_rows = None if row_scale is None else np.asarray(row_scale, dtype=np.float64).ravel()
    if uses_dual(k, n):
        x = np.asarray(phi, dtype=np.float64)
        raise_if_nonfinite(x, 0, "training features")
        a_w = (x * col_w) @ x.T
        scale = float(np.trace(a_w)) / k
        evals, u = np.linalg.eigh(a_w)
        left = ((q * col_w) @ x.T) @ u                                 # (Q, N): φ_q W Φᵀ U
        for c in grid:
            scores = (left / (evals + float(c) * scale)) @ u.T
            yield float(c), scores if scale_rows is None else scores * scale_rows
        return
    if gram is None:
        gram = accumulate_gram(phi, slices, "shared", chunk_rows=chunk_rows).blocks[0]
    d = np.sqrt(col_w)
    dgd = np.asarray(gram, dtype=np.float64) * d[:, None] * d[None, :]
    scale = float(np.mean(np.diag(dgd)))
    evals, v = np.linalg.eigh(dgd)
    dv = d[:, None] * v
    left = q @ dv                                                      # (Q, k): φ_q D V
    for c in grid:
        r = (left / (evals + float(c) * scale)) @ dv.T                 # (Q, k): φ_q K_w(c)
        scores = np.empty((len(q), n))
        for start, stop in row_chunks(n, chunk_rows):
            scores[:, start:stop] = r @ np.asarray(phi[start:stop], dtype=np.float64).T
        yield float(c), scores if scale_rows is None else scores * scale_rows


def choose_inside_c(train_features: Any, group_slices: Any, weights: Any, query_features: Any, families: list, *,
                    k: int, grid: Any = INSIDE_GRID, row_scale: Any = None, gram: np.ndarray | None = None,
                    progress: bool = False) -> tuple[float, list[list[float]]]:
    """(c, [[c, loss], ...]): the c of `grid` whose inside kernel gives the learning queries the best family
    criterion (loss = minus the criterion, as `lambda_grid` tables record losses; on equal losses the smaller c)."""
    values = [float(c) for c in grid]
    if not values or not all(np.isfinite(c) and c > 0 for c in values):
        raise UserError(f"the inside λ grid must be finite positive numbers, got {grid!r}")
    table = []
    scored = inside_scores(train_features, group_slices, weights, query_features, values, row_scale=row_scale,
                           gram=gram)
    for c, scores in tqdm(scored, total=len(values), disable=not progress, desc="inside λ", leave=False):
        table.append([c, -family_signal(scores, families, k, permutations=0)[0]])
    best = min(range(len(table)), key=lambda i: (table[i][1], table[i][0]))
    return table[best][0], table
