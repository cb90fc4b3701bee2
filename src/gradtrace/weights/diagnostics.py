"""Diagnostics of learned weights: per-group solo quality and the cosine between two weight vectors."""
from __future__ import annotations

from typing import Any

import numpy as np

from gradtrace.errors import UserError
from gradtrace.methods.checks import check_matrix, raise_if_nonfinite
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.defaults import DEFAULT_K
from gradtrace.weights.objective import check_k
from gradtrace.weights.streamed import snr_per_group


def solo_quality(fitted: FittedMethod, query_features: Any, k: int = DEFAULT_K, *, chunk_rows: int = 65536,
                 progress: bool = False) -> np.ndarray:
    """(M,) SNR objective mean_q L(e_j; q) with all weight on group j (lower is better), one pass over Ψ."""
    if not isinstance(fitted, FittedMethod):
        raise UserError(f"fitted must be a FittedMethod (from a method's .fit), got {type(fitted).__name__}")
    q = check_matrix(query_features, "query features", fitted.dim)
    raise_if_nonfinite(q, 0, "query features")
    return snr_per_group(fitted, np.asarray(q, dtype=np.float64), check_k(k, fitted.n_train),
                         chunk_rows=chunk_rows, progress=progress)


def cosine(w1: Any, w2: Any) -> float:
    """Cosine similarity of two weight vectors of the same length (1 = same direction)."""
    a, b = _vector(w1, "w1"), _vector(w2, "w2")
    if a.shape != b.shape:
        raise UserError(f"w1 and w2 have different lengths ({a.size} vs {b.size}); compare weights for the same groups")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise UserError("cosine of an all-zero weight vector is undefined; pass non-zero weights")
    return float(a @ b / (na * nb))


def _vector(w: Any, what: str) -> np.ndarray:
    if hasattr(w, "detach"):
        w = w.detach().cpu().numpy()
    try:
        v = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{what} could not be read as numbers; pass one weight per group") from None
    if v.ndim != 1 or not np.isfinite(v).all():
        raise UserError(f"{what} must be a finite 1-D vector of group weights, got shape {tuple(v.shape)}")
    return v
