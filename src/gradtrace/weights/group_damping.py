"""Label-free per-group damping: one λ scale c_j per group of the per-group TRAK kernel.

    λ_j = c_j · mean diag(Φ_jᵀΦ_j),   c_j ∈ grid (log-spaced 1e-4..1 by default)

chosen by coordinate descent on the same objective as the global c (`lambda_scale.py`): the uniform-weight
SNR loss mean_q L(1; q) on the *learning* queries. Group j's contribution c_j(q, n) = φ_j(q)·ψ_j(x_n)
depends on its own λ_j only, so every candidate's contributions come from one fit per grid value; the
descent starts from the global choice (all c_j = `start_c`) and moves one group at a time to the grid value
with the lowest loss, for `sweeps` passes over the groups (or until nothing moves). It never ends above
the loss it started from.

Memory: the contributions of every grid value are kept, G × Q × N × M float32 (refused above `max_bytes`),
so this is for learning sets of hundreds of queries against up to ~10⁵ training rows at modest M.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gradtrace.errors import UserError
from gradtrace.methods.checks import check_group_slices, check_matrix, check_train_matrix, raise_if_nonfinite
from gradtrace.methods.registry import configure, get_method, lambda_grid
from gradtrace.weights.objective import check_k
from gradtrace.weights.streamed import per_query_loss

MAX_BYTES = 4 * 2**30


def snr_of_scores(scores: np.ndarray, k: int) -> float:
    """mean_q L(q) for a dense (Q, N) score matrix: −(mean of the top-k) / L2 norm, averaged over queries."""
    top = -np.partition(-scores, k - 1, axis=1)[:, :k]
    return float(per_query_loss(top.mean(axis=1), np.linalg.norm(scores, axis=1)).mean())


def choose_group_lambda_scales(train_features: Any, group_slices: Any, learning_query_features: Any, *,
                               start_c: float, method: str = "trak", grid: Any = None, k: int = 10,
                               sweeps: int = 2, row_scale: Any = None,
                               max_bytes: int = MAX_BYTES) -> tuple[dict[str, float], dict[str, Any]]:
    """({group: c_j}, a record {start_c, start_loss, loss, sweeps_run, converged, moves, grid}) for the per-group
    kernel."""
    phi = check_train_matrix(train_features)
    slices = check_group_slices(group_slices, phi.shape[1])
    queries = np.asarray(check_matrix(learning_query_features, "learning query features", phi.shape[1]),
                         dtype=np.float64)
    raise_if_nonfinite(queries, 0, "learning query features")
    k = check_k(k, phi.shape[0])
    method = method if isinstance(method, str) else method.name  # a configured method: its name (kernel as given)
    bare = configure(method, c=None)
    if not bare.uses_lambda or bare.needs_model or not getattr(bare, "shares_gram", False):
        raise UserError(f"method '{method}' has no λ on features to choose; use 'trak', 'dtrak' or 'das'")
    values = sorted({float(c) for c in (lambda_grid() if grid is None else grid)} | {float(start_c)})
    n_q, n, m = queries.shape[0], phi.shape[0], len(slices)
    need = len(values) * n_q * n * m * 4
    if need > max_bytes:
        raise UserError(f"per-group damping keeps {len(values)} x {n_q} x {n} x {m} contributions "
                        f"({need / 2**30:.1f} GiB); use fewer learning queries or one global c")
    gram = get_method(method, c=values[0], kernel="per-group").gram(phi, slices)
    contrib = np.stack([get_method(method, c=c, kernel="per-group").fit(phi, slices, gram=gram, row_scale=row_scale)
                        .contributions(queries) for c in values])          # (G, Q, N, M)
    current = [values.index(float(start_c))] * m
    total = contrib[current[0]].sum(axis=2, dtype=np.float64)
    start_loss = loss = snr_of_scores(total, k)
    moves, run, converged = 0, 0, False
    for run in range(1, int(sweeps) + 1):
        moved = 0
        for j in range(m):
            base = total - contrib[current[j], :, :, j]
            trials = [snr_of_scores(base + contrib[g, :, :, j], k) for g in range(len(values))]
            best = min(range(len(values)), key=lambda g: (trials[g], g != current[j]))
            if best != current[j] and trials[best] < loss:
                current[j], total, loss = best, base + contrib[best, :, :, j], trials[best]
                moved += 1
        moves += moved
        if not moved:
            converged = True
            break
    chosen = {name: values[g] for (name, _, _), g in zip(slices, current)}
    return chosen, {"start_c": float(start_c), "start_loss": start_loss, "loss": loss, "sweeps_run": run,
                    "converged": converged, "moves": moves, "grid": values}
