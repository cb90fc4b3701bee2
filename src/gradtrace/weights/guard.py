"""A label-free guard: keep only as much of the learned weights as carries over to learning queries not seen.

The weights are fitted to the learning queries; nothing says the objective's gain holds on other queries.
The guard cross-fits: the learning queries are split in two halves (a seeded permutation), weights are learned
on each half, and each half's θ, shrunk towards uniform as softmax(α θ), is scored by the objective on the other
half, query by query. Every learning query is held out once, so each α has one held-out gain per query,

    d_q(α) = L(softmax(α θ_other half); q) − L(uniform; q)       (lower is better)

with mean g(α) and standard error s(α) over the queries. α* follows the one-standard-error rule of
cross-validation (Breiman et al. 1984; Hastie, Tibshirani and Friedman, *The Elements of Statistical Learning*,
§7.10): the smallest α of `SHRINKS` whose g is within one standard error of the best, g(α) ≤ g(α_best) + s(α_best).
So α* = 0 (uniform) unless the best gain is more than one standard error below zero, and a gain the held-out
queries barely tell from a smaller one is not taken. The returned weights are softmax(α* θ) with θ learned on all
learning queries. No label is used: only the learning queries' own objective, on queries the weights were not
fitted to.

`"auto"` (the pipeline's default) is this guard wherever the learning queries can be halved (`MIN_QUERIES`), and
no guard otherwise.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gradtrace.choices import GUARDS  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.weights.objective import softmax_weights

SHRINKS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_QUERIES = 4  # two per half
RULE = "two-fold cross-fit, weights = softmax(shrink * theta); shrink: the one-standard-error rule"


def resolve_guard(guard: str, n_queries: int) -> str:
    """The guard that runs: "auto" is "holdout" for at least `MIN_QUERIES` learning queries, else "none"."""
    if guard not in GUARDS:
        raise UserError(f"unknown guard '{guard}'; use one of: {', '.join(GUARDS)}")
    if guard == "auto":
        return "holdout" if n_queries >= MIN_QUERIES else "none"
    return guard


def one_se_shrink(diffs: np.ndarray, shrinks=SHRINKS) -> tuple[float, np.ndarray, np.ndarray]:
    """(α*, mean gain per α, its standard error) from per-query held-out gains `diffs` (len(shrinks), Q)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    mean = diffs.mean(axis=1)
    se = diffs.std(axis=1, ddof=1) / np.sqrt(diffs.shape[1]) if diffs.shape[1] > 1 else np.zeros(len(mean))
    best = int(np.argmin(mean))
    bound = mean[best] + se[best]
    if not bound < 0:
        return 0.0, mean, se
    return float(next(a for a, m in zip(shrinks, mean) if m <= bound)), mean, se


def holdout_shrink(n_queries: int, learn_theta: Callable[[np.ndarray], np.ndarray],
                   held_out_loss: Callable[[np.ndarray, np.ndarray], np.ndarray], *, seed: int = 0,
                   shrinks=SHRINKS) -> tuple[float, dict]:
    """(α*, the table behind it). `learn_theta(rows)` learns θ on those learning-query rows;
    `held_out_loss(rows, w)` is the objective of each of those rows at weights w (no λ term), a (len(rows),) array."""
    if n_queries < MIN_QUERIES:
        raise UserError(f"the holdout guard splits the learning queries in two halves; it needs at least "
                        f"{MIN_QUERIES}, got {n_queries}: pass more learning queries or --guard none")
    perm = np.random.default_rng([int(seed), 0x4755]).permutation(n_queries)
    halves = [np.sort(perm[0::2]), np.sort(perm[1::2])]
    diffs = np.zeros((len(shrinks), n_queries))
    folds = []
    for this, other in ((0, 1), (1, 0)):
        theta = torch.from_numpy(np.asarray(learn_theta(halves[this]), dtype=np.float64))
        m = theta.shape[0]
        uniform = np.asarray(held_out_loss(halves[other], np.full(m, 1.0 / m)), dtype=np.float64)
        losses = [np.asarray(held_out_loss(halves[other], softmax_weights(a * theta).numpy()), dtype=np.float64)
                  for a in shrinks]
        for i, loss in enumerate(losses):
            diffs[i, halves[other]] = loss - uniform
        folds.append({"learned_on": len(halves[this]), "scored_on": len(halves[other]),
                      "uniform_loss": float(uniform.mean()),
                      "loss_by_shrink": dict(zip(map(str, shrinks), (float(v.mean()) for v in losses)))})
    alpha, mean, se = one_se_shrink(diffs, shrinks)
    return alpha, {"rule": RULE, "shrink": alpha, "gain_by_shrink": dict(zip(map(str, shrinks), mean.tolist())),
                   "se_by_shrink": dict(zip(map(str, shrinks), se.tolist())), "folds": folds,
                   "seed": int(seed), "halves": [h.tolist() for h in halves]}
