"""Learn one non-negative weight per parameter group, without labels.

    w = softmax(θ), θ₀ = 0 (uniform);  θ* = argmin_θ mean_q L(w; q) + λ ‖w‖²

AdamW on θ (weight_decay 0: the only regulariser is the λ‖w‖² term above), full batch: every step uses
all learning queries. Two equivalent evaluations of mean_q L:

- "dense": the (Q, N, M) float64 contribution tensor and `snr_loss`, when Q·N·M·8 bytes fit the budget;
- "scalable": G_q from S = ΨᵀΨ for the noise, candidate pools for the signal, never building
  Q × N × M. refresh="lazy" (default, `lazy`): float32 passes on a per-query schedule, misses found
  at a refresh undone by rolling θ and the optimizer back, exact final top-k. refresh="exact"
  (`pool`) selects the same top-k as the dense path at every step, proven by a bound (same loss curve
  up to float32 rounding), at many more passes; refresh="fast" is approximate between pool rebuilds
  and exact at the returned weights.

Defaults: k = 10, steps = 200, lr = 0.05, l2 = 0, pool_size = 256, refresh = "lazy", memory budget
64 MiB. From the planted-signal sweep (docs/benchmarks.md, "Weight learning at scale"): held-out recall
of the planted rows saturates once lr·steps ≳ 1.5 and the objective settles at lr·steps ≈ 5; lr = 0.05 with
200 steps gives twice that; larger lr (0.3) gets there faster but its weights wander afterwards; l2 only
pulls towards uniform; k from 5 to 50 made no difference to recall.
"""
from __future__ import annotations

import copy
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
from gradtrace.weights.defaults import (
    DEFAULT_K,
    DEFAULT_L2,
    DEFAULT_LR,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_POOL,
    DEFAULT_REFRESH,
    DEFAULT_STEPS,
)
from gradtrace.weights.guard import holdout_shrink, resolve_guard
from gradtrace.weights.lazy import LazyObjective
from gradtrace.weights.objective import check_k, snr_loss, softmax_weights
from gradtrace.weights.pool import TRIGGERS
from gradtrace.weights.row_source import RowSource, Shard
from gradtrace.weights.scalable import ScalableObjective
from gradtrace.weights.threads import threads

REFRESH_MODES = ("lazy",) + TRIGGERS


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
                  refresh: str = DEFAULT_REFRESH, guard: str = "none", progress: bool = True,
                  shard: Shard | None = None) -> WeightsResult:
    """Learn group weights on learning queries (never the evaluation queries) for a fitted base method.

    `query_features` (Q, dim) are the learning queries' features in the fitted method's layout. The
    dense path is used when Q·N·M·8 bytes ≤ `memory_budget_bytes`, else the scalable path with
    `pool_size` candidates per query and `refresh` "lazy" (default, `gradtrace.weights.lazy`), "exact" (every step
    proven, `gradtrace.weights.pool`) or "fast" (approximate between rebuilds). `guard` "holdout" shrinks the weights
    towards uniform as far as their gain does not carry over to held-out learning queries (`gradtrace.weights.guard`);
    "none" (this function's default) returns them as learned; "auto" (the stages' default, `learn-weights`) is
    "holdout" for at least 4 learning queries and "none" below. Deterministic for given inputs and `seed`.

    `shard` (a torchrun rank): `fitted` holds Ψ of the rank's rows only; every pass over Ψ is merged over the ranks
    (`gradtrace.weights.row_source`), so every rank returns the same result, that of one process on all rows up to
    the order of float64 sums over rows. Only the lazy refresh splits (`refresh="lazy"`).
    """
    if not isinstance(fitted, FittedMethod):
        raise UserError(f"fitted must be a FittedMethod (from a method's .fit), got {type(fitted).__name__}")
    if fitted.query_side:
        raise UserError("the weight learner needs Ψ = Φ K; fit the method without query_side=True")
    phi_q = check_matrix(query_features, "learning query features", fitted.dim)
    raise_if_nonfinite(phi_q, 0, "learning query features")
    phi_q = np.asarray(phi_q, dtype=np.float64)
    if shard is not None and refresh != "lazy":
        raise UserError(f"refresh '{refresh}' reads Ψ through the fitted method, which a rank holds only part of; "
                        "use refresh='lazy' over ranks")
    rows = RowSource(fitted, shard)
    k = check_k(k, rows.n)
    opts = {"k": k, "steps": _check_int(steps, "steps", 0), "lr": _check_number(lr, "lr", positive=True),
            "l2": _check_number(l2, "l2", positive=False), "seed": _check_int(seed, "seed", 0),
            "budget": _check_int(memory_budget_bytes, "memory_budget_bytes", 1),
            "pool_size": _check_int(pool_size, "pool_size", 1), "refresh": refresh, "rows": rows}
    if refresh not in REFRESH_MODES:
        raise UserError(f"unknown refresh '{refresh}'; use one of: {', '.join(REFRESH_MODES)}")
    requested, guard = guard, resolve_guard(guard, len(phi_q))
    start = time.perf_counter()
    alpha, table = 1.0, None
    if guard == "holdout":
        objectives: dict = {}

        def held_out_loss(rows: np.ndarray, w: np.ndarray) -> np.ndarray:
            key = rows.tobytes()
            if key not in objectives:
                objectives[key] = _objective(fitted, phi_q[rows], opts, progress=False)[0]
            w_t = torch.from_numpy(np.asarray(w, np.float64))
            return objectives[key](w_t, last=True, per_query=True).detach().numpy()

        alpha, table = holdout_shrink(len(phi_q), lambda rows: _learn(fitted, phi_q[rows], opts, False)[0],
                                      held_out_loss, seed=opts["seed"])
    theta, curve, info = _learn(fitted, phi_q, opts, progress)
    weights = softmax_weights(torch.from_numpy(alpha * theta)).numpy().astype(np.float64)
    if table is not None:
        table["seconds"] = time.perf_counter() - start - sum(info["seconds"].values())
        info["guard"] = table
        if alpha != 1.0:  # the objective at the weights returned, not at the unshrunk ones
            info["unguarded_final_loss"] = info["final_loss"]
            info["final_loss"] = _objective_value(fitted, phi_q, opts, weights)
    info["guard_mode"] = guard
    info["guard_requested"] = requested
    return WeightsResult(weights=weights, theta=alpha * theta, group_names=fitted.group_names, loss_curve=curve,
                         info=info)


MAX_DENSE_BYTES = 8 * 2**30  # the dense path is not taken beyond this, whatever the features' width


def _objective(fitted: FittedMethod, phi_q: np.ndarray, opts: dict, progress: bool):
    """(callable w -> mean_q L(w; q), "dense" | "scalable") for these learning queries."""
    k, rows = opts["k"], opts["rows"]
    dense_bytes = phi_q.shape[0] * rows.n * fitted.n_groups * 8
    # the scalable paths keep ΨᵀΨ (dim x dim): where that is larger than the dense tensor (features far wider than
    # the learning problem, e.g. exact gradients of a small training set), the dense path is the cheaper one
    if dense_bytes <= max(opts["budget"], 8 * fitted.dim ** 2):
        if dense_bytes > MAX_DENSE_BYTES:
            raise UserError(f"learning weights over {fitted.dim} feature columns needs a {fitted.dim}² Gram or "
                            f"{dense_bytes / 2**30:.1f} GiB of contributions; project the gradients to fewer "
                            f"columns (featurize --dim) or use fewer learning queries")
        contrib = torch.from_numpy(rows.dense(phi_q))

        def dense(w, last=False, per_query=False):
            return snr_loss(contrib, w, k, per_query=per_query)
        return dense, "dense"
    if opts["pool_size"] < k:
        raise UserError(f"pool_size = {opts['pool_size']} is smaller than k = {k}; pass pool_size >= k (e.g. 256)")
    if opts["refresh"] == "lazy":
        return LazyObjective(fitted, phi_q, k=k, pool_size=opts["pool_size"], progress=progress, rows=rows), "scalable"
    return ScalableObjective(fitted, phi_q, k=k, pool_size=opts["pool_size"], trigger=opts["refresh"],
                             progress=progress), "scalable"


def _objective_value(fitted: FittedMethod, phi_q: np.ndarray, opts: dict, w: np.ndarray) -> float:
    objective, _ = _objective(fitted, phi_q, opts, progress=False)
    return float(objective(torch.from_numpy(np.asarray(w, np.float64)), last=True).detach())


def _learn(fitted: FittedMethod, phi_q: np.ndarray, opts: dict, progress: bool) -> tuple[np.ndarray, list, dict]:
    """(θ, loss curve, info) of AdamW on θ from 0 (uniform) for these learning queries."""
    return _optimise(lambda: _objective(fitted, phi_q, opts, progress), (phi_q.shape[0], opts["rows"].n,
                                                                         fitted.n_groups), opts, progress)


def _optimise(make_objective, shape: tuple[int, int, int], opts: dict,
              progress: bool) -> tuple[np.ndarray, list, dict]:
    """(θ, loss curve, info) of AdamW on θ from 0 (uniform); `make_objective()` → (w -> mean_q L, path name)."""
    n_q, n, m = shape
    torch.manual_seed(opts["seed"])
    start = time.perf_counter()
    info: dict[str, Any] = {"k": opts["k"], "steps": opts["steps"], "lr": opts["lr"], "l2": opts["l2"],
                            "seed": opts["seed"], "Q": n_q, "N": n, "M": m, "dense_bytes": n_q * n * m * 8}
    objective, info["path"] = make_objective()
    precompute = time.perf_counter() - start

    theta = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.AdamW([theta], lr=opts["lr"], weight_decay=0.0)
    curve: list[float] = []
    steps = opts["steps"]
    bar = tqdm(total=steps + 1, desc="weights: learn", unit="step", disable=not progress)
    saved: dict[int, tuple] = {}      # θ and optimizer state before each step, for a rollback
    step = 0
    with threads(getattr(objective, "step_threads", None)):  # the lazy objective: 1 (passes lift it)
        while True:
            if getattr(objective, "rollback", False) is not False:
                saved[step] = (theta.detach().clone(), _snapshot(optimiser))
            w = softmax_weights(theta)
            snr = objective(w, last=step == steps)
            back = getattr(objective, "rollback", None)
            if back is not None:          # the lazy objective found a missed row at step `back`: redo from there
                with torch.no_grad():
                    theta.copy_(saved[back][0])
                optimiser.load_state_dict(copy.deepcopy(saved[back][1]))
                del curve[back:]
                bar.update(back - step)
                step = back
                continue
            bar.update(1)
            total = snr + opts["l2"] * torch.dot(w, w)
            curve.append(float(total.detach()))
            if step == 0:
                info["uniform_loss"] = float(snr.detach())
            if step == steps:
                info["final_loss"] = float(snr.detach())
                break
            optimiser.zero_grad()
            total.backward()
            optimiser.step()
            step += 1
    bar.close()
    info["seconds"] = {"precompute": precompute, "steps": time.perf_counter() - start - precompute}
    if isinstance(objective, (ScalableObjective, LazyObjective)):
        info["seconds"].update(objective.seconds)
        info["pool"] = objective.pool_info()
        info["memory_bytes"] = objective.memory_bytes()
    return theta.detach().numpy().copy(), curve, info


def optimise_weights(make_objective, shape: tuple[int, int, int], opts: dict,
                     progress: bool) -> tuple[np.ndarray, list, dict]:
    """AdamW on θ from 0 (uniform) for another objective of w (`gradtrace.weights.family`): `make_objective()` →
    (w -> loss, path name); `opts` holds k, steps, lr, l2 and seed; returns (θ, loss curve, info)."""
    return _optimise(make_objective, shape, opts, progress)


def _snapshot(optimiser: torch.optim.Optimizer) -> dict:
    """A copy of the optimizer's state dict (its tensors cloned), for a rollback."""
    state = optimiser.state_dict()
    return {"state": {key: {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in entry.items()}
                      for key, entry in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}


def learn_weights_dense(contrib: Any, group_names: list[str], *, k: int = DEFAULT_K, steps: int = DEFAULT_STEPS,
                        lr: float = DEFAULT_LR, l2: float = DEFAULT_L2, seed: int = 0, guard: str = "none",
                        progress: bool = True) -> WeightsResult:
    """Learn group weights from dense contributions c_j(q, n) (Q, N, M) of learning queries (never the evaluation
    queries), for base methods that give contributions directly (EK-FAC): the objective only needs
    τ_w = Σ_j w_j c_j, so this is `learn_weights`'s dense path on a given tensor (same AdamW, same guard)."""
    c = np.asarray(contrib, dtype=np.float64)
    if c.ndim != 3 or c.shape[2] != len(group_names) or min(c.shape) < 1:
        raise UserError(f"contributions must be (queries, training examples, groups) with {len(group_names)} groups, "
                        f"got shape {c.shape}")
    raise_if_nonfinite(c.reshape(-1, c.shape[2]), 0, "contributions")
    opts = {"k": check_k(k, c.shape[1]), "steps": _check_int(steps, "steps", 0),
            "lr": _check_number(lr, "lr", positive=True), "l2": _check_number(l2, "l2", positive=False),
            "seed": _check_int(seed, "seed", 0)}
    requested, guard = guard, resolve_guard(guard, c.shape[0])
    tensor = torch.from_numpy(c)

    def objective(rows):
        part = tensor[torch.as_tensor(rows)]
        return lambda: ((lambda w, last=False: snr_loss(part, w, opts["k"])), "dense")  # noqa: E731

    def run(rows, show):
        return _optimise(objective(rows), (len(rows), c.shape[1], c.shape[2]), opts, show)

    start = time.perf_counter()
    alpha, table = 1.0, None
    if guard == "holdout":
        alpha, table = holdout_shrink(
            c.shape[0], lambda rows: run(rows, False)[0],
            lambda rows, w: snr_loss(tensor[torch.as_tensor(rows)], torch.from_numpy(np.asarray(w, np.float64)),
                                     opts["k"], per_query=True).numpy(), seed=opts["seed"])
    theta, curve, info = run(np.arange(c.shape[0]), progress)
    weights = softmax_weights(torch.from_numpy(alpha * theta)).numpy().astype(np.float64)
    if table is not None:
        table["seconds"] = time.perf_counter() - start - sum(info["seconds"].values())
        info["guard"] = table
        if alpha != 1.0:
            info["unguarded_final_loss"] = info["final_loss"]
            info["final_loss"] = float(snr_loss(tensor, torch.from_numpy(weights), opts["k"]))
    info["guard_mode"] = guard
    info["guard_requested"] = requested
    return WeightsResult(weights=weights, theta=alpha * theta, group_names=list(group_names), loss_curve=curve,
                         info=info)


def dense_contributions(fitted: FittedMethod, phi_q: np.ndarray, *, chunk_rows: int = 65536) -> np.ndarray:
    """(Q, N, M) float64 contributions c_j(q, n), reading Ψ in row chunks."""
    return RowSource(fitted).dense(phi_q, chunk_rows=chunk_rows)


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
