"""The holdout guard: its table equals a recomputation from the halves it records, it keeps weights whose gain
carries over to held-out learning queries, and returns uniform weights when the gain does not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtrace.errors import UserError
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights import dense_contributions, learn_weights, snr_loss
from gradtrace.weights.guard import SHRINKS
from gradtrace.weights.planted import even_slices, planted_problem, planted_recall

K, STEPS = 5, 60


def _held_out_loss(fitted, queries, rows, w):
    contrib = torch.from_numpy(dense_contributions(fitted, np.asarray(queries[rows], dtype=np.float64)))
    return float(snr_loss(contrib, torch.from_numpy(np.asarray(w, dtype=np.float64)), K))


def test_guard_table_equals_a_recomputation_from_its_halves():
    prob = planted_problem(600, 12, 6, 96, seed=3)
    res = learn_weights(prob.fitted, prob.queries, k=K, steps=STEPS, guard="holdout", progress=False)
    table = res.info["guard"]
    halves = [np.asarray(h) for h in table["halves"]]
    assert sorted(np.concatenate(halves).tolist()) == list(range(12)) and abs(len(halves[0]) - len(halves[1])) <= 1
    gains = np.zeros(len(SHRINKS))
    for this, other in ((0, 1), (1, 0)):
        theta = learn_weights(prob.fitted, prob.queries[halves[this]], k=K, steps=STEPS, progress=False).theta
        base = _held_out_loss(prob.fitted, prob.queries, halves[other], np.full(6, 1 / 6))
        for i, a in enumerate(SHRINKS):
            w = torch.softmax(torch.from_numpy(a * theta), 0).numpy()
            gains[i] += _held_out_loss(prob.fitted, prob.queries, halves[other], w) - base
    np.testing.assert_allclose([table["gain_by_shrink"][str(a)] for a in SHRINKS], gains, rtol=1e-9, atol=1e-12)
    assert table["shrink"] == (SHRINKS[int(np.argmin(gains))] if gains.min() < 0 else 0.0)


def test_guard_keeps_weights_whose_gain_carries_over():
    prob = planted_problem(600, 12, 6, 96, seed=4)
    plain = learn_weights(prob.fitted, prob.queries, k=K, steps=STEPS, progress=False)
    guarded = learn_weights(prob.fitted, prob.queries, k=K, steps=STEPS, guard="holdout", progress=False)
    alpha = guarded.info["guard"]["shrink"]
    assert alpha > 0  # one group carries every query's signal: the held-out halves gain from it
    np.testing.assert_array_equal(guarded.theta, alpha * plain.theta)
    np.testing.assert_allclose(guarded.weights, torch.softmax(torch.from_numpy(alpha * plain.theta), 0).numpy())
    assert planted_recall(prob.fitted, prob.queries, prob.planted, guarded.weights, K) > \
        planted_recall(prob.fitted, prob.queries, prob.planted, None, K)


def _private_signal_problem(seed: int = 0, n: int = 400, m: int = 8, width: int = 16):
    """Query q's planted rows stand out in group q only: weights fitted to some queries hurt the others."""
    rng = np.random.default_rng(seed)
    dim = m * width
    slices = even_slices(dim, m)
    queries = rng.standard_normal((m, dim)).astype(np.float32)
    psi = rng.standard_normal((n, dim)).astype(np.float32)
    rows = rng.choice(n, size=(m, 5), replace=False)
    for q, (_, s, e) in enumerate(slices):
        psi[rows[q], s:e] += 6.0 * queries[q, s:e] / np.linalg.norm(queries[q, s:e])
    return FittedMethod(psi=psi, group_slices=slices, info={"method": "private"}), queries


def test_guard_returns_uniform_when_the_gain_does_not_carry_over():
    fitted, queries = _private_signal_problem()
    plain = learn_weights(fitted, queries, k=K, steps=STEPS, progress=False)
    assert plain.info["final_loss"] < plain.info["uniform_loss"]  # fitted to the learning queries themselves
    guarded = learn_weights(fitted, queries, k=K, steps=STEPS, guard="holdout", progress=False)
    table = guarded.info["guard"]
    assert all(table["gain_by_shrink"][str(a)] > 0 for a in SHRINKS if a > 0)
    assert table["shrink"] == 0.0
    np.testing.assert_array_equal(guarded.weights, np.full(8, 1 / 8))
    assert guarded.info["final_loss"] == pytest.approx(guarded.info["uniform_loss"], rel=1e-12)


def test_guard_refuses_too_few_queries_and_unknown_modes():
    prob = planted_problem(200, 3, 4, 32, seed=1)
    with pytest.raises(UserError, match="at least 4"):
        learn_weights(prob.fitted, prob.queries, k=K, guard="holdout", progress=False)
    with pytest.raises(UserError, match="unknown guard"):
        learn_weights(prob.fitted, prob.queries, k=K, guard="maybe", progress=False)
