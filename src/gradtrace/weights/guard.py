"""A label-free guard: keep only as much of the learned weights as carries over to learning queries not seen.

The weights are fitted to the learning queries; nothing says the objective's gain holds on other queries.
The guard cross-fits: the learning queries are split in two halves (a seeded permutation), weights are learned
on each half, and each half's θ, shrunk towards uniform as softmax(α θ), is scored by the objective on the other
half. The held-out gain of α is

    g(α) = Σ_halves [ L(softmax(α θ_this); other half) − L(uniform; other half) ]       (lower is better)

and α* = the α of `SHRINKS` with the lowest g, taking α* = 0 (uniform) unless some α > 0 has g < 0. The returned
weights are softmax(α* θ) with θ learned on all learning queries. No label is used: only the learning queries'
own objective, on queries the weights were not fitted to.
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


def holdout_shrink(n_queries: int, learn_theta: Callable[[np.ndarray], np.ndarray],
                   held_out_loss: Callable[[np.ndarray, np.ndarray], float], *, seed: int = 0,
                   shrinks=SHRINKS) -> tuple[float, dict]:
    """(α*, the table behind it). `learn_theta(rows)` learns θ on those learning-query rows;
    `held_out_loss(rows, w)` is the objective (mean over those rows, no λ term) at weights w."""
    if n_queries < MIN_QUERIES:
        raise UserError(f"the holdout guard splits the learning queries in two halves; it needs at least "
                        f"{MIN_QUERIES}, got {n_queries}: pass more learning queries or --guard none")
    perm = np.random.default_rng([int(seed), 0x4755]).permutation(n_queries)
    halves = [np.sort(perm[0::2]), np.sort(perm[1::2])]
    gains = np.zeros(len(shrinks))
    folds = []
    for this, other in ((0, 1), (1, 0)):
        theta = torch.from_numpy(np.asarray(learn_theta(halves[this]), dtype=np.float64))
        m = theta.shape[0]
        uniform = held_out_loss(halves[other], np.full(m, 1.0 / m))
        losses = [held_out_loss(halves[other], softmax_weights(a * theta).numpy()) for a in shrinks]
        gains += np.asarray(losses) - uniform
        folds.append({"learned_on": len(halves[this]), "scored_on": len(halves[other]),
                      "uniform_loss": uniform, "loss_by_shrink": dict(zip(map(str, shrinks), losses))})
    best = int(np.argmin(gains))
    alpha = float(shrinks[best]) if gains[best] < 0 else 0.0
    return alpha, {"rule": "two-fold cross-fit; weights = softmax(shrink * theta)", "shrink": alpha,
                   "gain_by_shrink": dict(zip(map(str, shrinks), gains.tolist())), "folds": folds,
                   "seed": int(seed), "halves": [h.tolist() for h in halves]}
