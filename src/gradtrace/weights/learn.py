"""Learn one non-negative weight per parameter group, without labels.

    w = softmax(θ), θ₀ = 0 (uniform);  θ* = argmin_θ mean_q L(w; q) + λ ‖w‖²

AdamW on θ (weight_decay 0: the only regulariser is the λ‖w‖² term above), full batch: every step uses
all learning queries. Two equivalent evaluations of mean_q L:

- "dense": the (Q, N, M) float64 contribution tensor and `snr_loss`, when Q·N·M·8 bytes fit the budget;
- "scalable": G_q from S = ΨᵀΨ for the noise, candidate pools for the signal (see `pool`), never
  building Q × N × M. With refresh="exact" it selects the same top-k as the dense path at every step
  (same loss curve up to float32 rounding of the pool contributions); refresh="fast" is approximate
  between pool rebuilds and exact at the returned weights.

Defaults: k = 10, steps = 200, lr = 0.05, l2 = 0, pool_size = 256, refresh = "exact", memory budget
64 MiB. From the planted-signal sweep (docs/benchmarks.md, "Weight learning at scale"): held-out recall
of the planted rows saturates once lr·steps ≳ 1.5 and the objective settles at lr·steps ≈ 5; lr = 0.05 with
200 steps gives twice that; larger lr (0.3) gets there faster but its weights wander afterwards; l2 only
pulls towards uniform; k from 5 to 50 made no difference to recall.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace.errors import UserError
from gradtrace.methods.checks import check_matrix, raise_if_nonfinite
from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.rows import effective_chunk_rows, row_chunks
from gradtrace.weights.defaults import (DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_MEMORY_BUDGET, DEFAULT_POOL,
                                        DEFAULT_REFRESH, DEFAULT_STEPS)
from gradtrace.weights.objective import check_k, snr_loss, softmax_weights
from gradtrace.weights.pool import TRIGGERS
from gradtrace.weights.scalable import ScalableObjective


@dataclass
class WeightsResult:
    """Learned group weights (M,) float64 on the simplex, θ, names, objective per step and run facts.

    `loss_curve[i]` is mean_q L + λ‖w‖² at the weights before update i (len = steps + 1; the last
    entry is at the returned weights). `info` holds k, steps, lr, l2, Q, N, M, path, final_loss and
    uniform_loss (both mean_q L without the λ term), seconds and, on the scalable path, pool counters.
    """

    weights: np.ndarray
    theta: np.ndarray
    group_names: list[str]
    loss_curve: list[float]
    info: dict[str, Any] = field(default_factory=dict)


def learn_weights(fitted: FittedMethod, query_features: Any, *, k: int = DEFAULT_K, steps: int = DEFAULT_STEPS,
                  lr: float = DEFAULT_LR, l2: float = DEFAULT_L2, seed: int = 0,
                  memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, pool_size: int = DEFAULT_POOL,
                  refresh: str = DEFAULT_REFRESH, progress: bool = True) -> WeightsResult:
    """Learn group weights on learning queries (never the evaluation queries) for a fitted base method.

    `query_features` (Q, dim) are the learning queries' features in the fitted method's layout. The
    dense path is used when Q·N·M·8 bytes ≤ `memory_budget_bytes`, else the scalable path with
    `pool_size` candidates per query and `refresh` "exact" (default; rigorous) or "fast" (approximate,
    see `gradtrace.weights.pool`). Deterministic for given inputs and `seed`.
    """
    if not isinstance(fitted, FittedMethod):
        raise UserError(f"fitted must be a FittedMethod (from a method's .fit), got {type(fitted).__name__}")
    if fitted.query_side:
        raise UserError("the weight learner needs Ψ = Φ K; fit the method without query_side=True")
    phi_q = check_matrix(query_features, "learning query features", fitted.dim)
    raise_if_nonfinite(phi_q, 0, "learning query features")
    phi_q = np.asarray(phi_q, dtype=np.float64)
    k = check_k(k, fitted.n_train)
    steps = _check_int(steps, "steps", 0)
    seed = _check_int(seed, "seed", 0)
    lr = _check_number(lr, "lr", positive=True)
    l2 = _check_number(l2, "l2", positive=False)
    budget = _check_int(memory_budget_bytes, "memory_budget_bytes", 1)
    pool_size = _check_int(pool_size, "pool_size", 1)
    if refresh not in TRIGGERS:
        raise UserError(f"unknown refresh '{refresh}'; use one of: {', '.join(TRIGGERS)}")
    n_q, n, m = phi_q.shape[0], fitted.n_train, fitted.n_groups
    dense_bytes = n_q * n * m * 8
    torch.manual_seed(seed)

    start = time.perf_counter()
    info: dict[str, Any] = {"k": k, "steps": steps, "lr": lr, "l2": l2, "seed": seed, "Q": n_q, "N": n, "M": m,
                            "dense_bytes": dense_bytes}
    if dense_bytes <= budget:
        contrib = torch.from_numpy(dense_contributions(fitted, phi_q))
        objective = lambda w, last=False: snr_loss(contrib, w, k)  # noqa: E731
        info["path"] = "dense"
    else:
        if pool_size < k:
            raise UserError(f"pool_size = {pool_size} is smaller than k = {k}; pass pool_size >= k (e.g. 256)")
        objective = ScalableObjective(fitted, phi_q, k=k, pool_size=pool_size, trigger=refresh, progress=progress)
        info["path"] = "scalable"
    precompute = time.perf_counter() - start

    theta = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.AdamW([theta], lr=lr, weight_decay=0.0)
    curve: list[float] = []
    loop = range(steps + 1)
    if progress:
        loop = tqdm(loop, desc="weights: learn", unit="step")
    for step in loop:
        w = softmax_weights(theta)
        snr = objective(w, last=step == steps)
        total = snr + l2 * torch.dot(w, w)
        curve.append(float(total.detach()))
        if step == 0:
            info["uniform_loss"] = float(snr.detach())
        if step == steps:
            info["final_loss"] = float(snr.detach())
            break
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    info["seconds"] = {"precompute": precompute, "steps": time.perf_counter() - start - precompute}
    if isinstance(objective, ScalableObjective):
        info["seconds"].update(objective.seconds)
        info["pool"] = objective.pool_info()
        info["memory_bytes"] = objective.memory_bytes()
    weights = softmax_weights(theta).detach().numpy().astype(np.float64)
    return WeightsResult(weights=weights, theta=theta.detach().numpy().copy(), group_names=fitted.group_names,
                         loss_curve=curve, info=info)


def dense_contributions(fitted: FittedMethod, phi_q: np.ndarray, *, chunk_rows: int = 65536) -> np.ndarray:
    """(Q, N, M) float64 contributions c_j(q, n), reading Ψ in row chunks."""
    out = np.empty((phi_q.shape[0], fitted.n_train, fitted.n_groups), dtype=np.float64)
    rows = effective_chunk_rows(chunk_rows, 8 * fitted.dim)
    for start, stop in row_chunks(fitted.n_train, rows):
        x = np.asarray(fitted.psi[start:stop], dtype=np.float64)
        for j, (_, s, e) in enumerate(fitted.group_slices):
            out[:, start:stop, j] = phi_q[:, s:e] @ x[:, s:e].T
    return out


def _check_int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise UserError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_number(value: Any, what: str, *, positive: bool) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        bound = "> 0" if positive else ">= 0"
        raise UserError(f"{what} must be finite and {bound}, got {value!r}")
    return x
