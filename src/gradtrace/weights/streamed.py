"""The SNR objective at fixed weights, exactly, in one streamed float64 pass over Ψ (no Q × N matrix kept).

    snr_at(fitted, queries, k, w)  = mean_q L(w; q)                 (one pass, Q·N·k flops; `snr_pass` its parts)
    snr_per_group(fitted, queries, k) = [mean_q L(e_j; q)]_j        (one pass, M running top-k's)
"""
from __future__ import annotations

import numpy as np

from gradtrace.methods.checks import block_scale
from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.rows import effective_chunk_rows, row_chunks
from gradtrace.methods.topk import RunningTopK


def per_query_loss(top_mean: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """−signal / noise per query, 0 where the noise is 0."""
    safe = np.where(norm > 0, norm, 1.0)
    return np.where(norm > 0, -top_mean / safe, 0.0)


def snr_at(fitted: FittedMethod, phi_q: np.ndarray, k: int, weights: np.ndarray | None = None, *,
           chunk_rows: int = 65536, progress: bool = False) -> float:
    """mean_q L(w; q) for checked float64 query features (Q, dim); `weights` None means uniform."""
    _, top, sumsq = snr_pass(fitted, phi_q, k, weights, chunk_rows=chunk_rows, progress=progress)
    return float(per_query_loss(top.mean(axis=1), np.sqrt(sumsq)).mean())


def snr_pass(fitted: FittedMethod, phi_q: np.ndarray, k: int, weights: np.ndarray | None = None, *,
             chunk_rows: int = 65536, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts of `snr_at` from one float64 pass over Ψ's rows: per query the top-k (rows, scores) and the sum of
    squared scores."""
    qw = phi_q if weights is None else phi_q * block_scale(fitted.group_slices, weights, fitted.dim)
    rows = effective_chunk_rows(chunk_rows, 8 * (fitted.dim + 2 * qw.shape[0]))
    running = RunningTopK(qw.shape[0], k)
    sumsq = np.zeros(qw.shape[0])
    for start, stop in row_chunks(fitted.n_train, rows, progress=progress, desc="weights: SNR"):
        block = qw @ np.asarray(fitted.psi[start:stop], dtype=np.float64).T
        sumsq += np.einsum("qn,qn->q", block, block)
        running.update(block, start)
    idx, top = running.result()
    return idx, top, sumsq


def snr_per_group(fitted: FittedMethod, phi_q: np.ndarray, k: int, *, chunk_rows: int = 65536,
                  progress: bool = False) -> np.ndarray:
    """(M,) mean_q L(e_j; q): the objective with all weight on group j, for every group j."""
    n_q, m = phi_q.shape[0], fitted.n_groups
    rows = effective_chunk_rows(chunk_rows, 8 * (fitted.dim + 2 * n_q))
    running = [RunningTopK(n_q, k) for _ in range(m)]
    sumsq = np.zeros((n_q, m))
    for start, stop in row_chunks(fitted.n_train, rows, progress=progress, desc="weights: per-group SNR"):
        x = np.asarray(fitted.psi[start:stop], dtype=np.float64)
        for j, (_, s, e) in enumerate(fitted.group_slices):
            block = phi_q[:, s:e] @ x[:, s:e].T
            sumsq[:, j] += np.einsum("qn,qn->q", block, block)
            running[j].update(block, start)
    out = np.empty(m)
    for j in range(m):
        _, top = running[j].result()
        out[j] = per_query_loss(top.mean(axis=1), np.sqrt(sumsq[:, j])).mean()
    return out
