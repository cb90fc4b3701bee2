"""The self-supervised SNR objective on dense per-group contributions (the reference definition).

    τ_w(q, n) = Σ_j w_j c_j(q, n)
    L(w; q)   = − [ (1/k) Σ_{n ∈ T_k(w, q)} τ_w(q, n) ] / ‖τ_w(q, ·)‖₂

T_k(w, q) are the indices of the k largest τ_w(q, ·), chosen on detached scores (constants for the
gradient). A query whose scores are all zero contributes 0 (its ratio is undefined).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gradtrace.errors import UserError


def snr_loss(contrib: torch.Tensor, w: torch.Tensor, k: int, *, per_query: bool = False) -> torch.Tensor:
    """Mean over queries of L(w; q) for dense contributions `contrib` (Q, N, M) and weights `w` (M,); with
    `per_query`, the (Q,) values L(w; q) themselves.

    Differentiable in `w` (and `contrib`); the top-k indices are detached. No λ term.
    """
    if not isinstance(contrib, torch.Tensor) or contrib.ndim != 3:
        shape = tuple(getattr(contrib, "shape", ()))
        raise UserError(f"contrib must be a 3-D torch tensor (queries, rows, groups), got shape {shape}")
    if not isinstance(w, torch.Tensor) or w.shape != (contrib.shape[2],):
        raise UserError(f"w must be a torch tensor of shape ({contrib.shape[2]},), one weight per group, "
                        f"got {tuple(getattr(w, 'shape', ()))}")
    k = check_k(k, contrib.shape[1])
    tau = contrib @ w.to(contrib.dtype)                      # (Q, N)
    idx = torch.topk(tau.detach(), k, dim=1).indices
    signal = torch.gather(tau, 1, idx).mean(dim=1)
    return ratio_loss(signal, tau.norm(dim=1), per_query=per_query)


def ratio_loss(signal: torch.Tensor, noise: torch.Tensor, *, per_query: bool = False) -> torch.Tensor:
    """mean_q −signal_q / noise_q, with 0 for queries whose noise is 0 (all scores zero); with `per_query`, the
    (Q,) values before the mean."""
    safe = torch.where(noise > 0, noise, torch.ones_like(noise))
    values = torch.where(noise > 0, -signal / safe, torch.zeros_like(signal))
    return values if per_query else values.mean()


def softmax_weights(theta: torch.Tensor) -> torch.Tensor:
    """w = softmax(θ): non-negative weights on the simplex."""
    return torch.softmax(theta, dim=0)


def check_k(k: Any, n_rows: int) -> int:
    """k as an int in [1, n_rows]; UserError otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise UserError(f"k must be a positive integer, got {k!r}; pass e.g. k=10")
    if int(k) > n_rows:
        raise UserError(f"k = {k} is larger than the training set ({n_rows} rows); pass k <= {n_rows}")
    return int(k)
