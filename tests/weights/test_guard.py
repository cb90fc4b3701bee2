"""The holdout guard: its table equals a recomputation from the halves it records, it keeps weights whose gain
carries over to held-out learning queries, and returns uniform weights when the gain does not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtrace.errors import UserError
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights import dense_contributions, learn_weights
from gradtrace.weights.guard import SHRINKS, one_se_shrink
from gradtrace.weights.planted import even_slices, planted_problem, planted_recall

K, STEPS = 5, 60


def _held_out_losses(fitted, queries, rows, w):
    """Per-query SNR losses by a plain loop: each held-out query's top-k mean over its score vector's norm."""
    out = []
    for q in rows:
        contrib = dense_contributions(fitted, np.asarray(queries[[q]], dtype=np.float64))[0]   # (N, M)
        tau = contrib @ np.asarray(w, dtype=np.float64)
        out.append(-np.sort(tau)[::-1][:K].mean() / np.linalg.norm(tau))
    return np.asarray(out)


def test_guard_table_equals_a_recomputation_from_its_halves():
    prob = planted_problem(600, 12, 6, 96, seed=3)
    res = learn_weights(prob.fitted, prob.queries, k=K, steps=STEPS, guard="holdout", progress=False)
    table = res.info["guard"]
    halves = [np.asarray(h) for h in table["halves"]]
    assert sorted(np.concatenate(halves).tolist()) == list(range(12)) and abs(len(halves[0]) - len(halves[1])) <= 1
    diffs = np.zeros((len(SHRINKS), 12))
    for this, other in ((0, 1), (1, 0)):
        theta = learn_weights(prob.fitted, prob.queries[halves[this]], k=K, steps=STEPS, progress=False).theta
        base = _held_out_losses(prob.fitted, prob.queries, halves[other], np.full(6, 1 / 6))
        for i, a in enumerate(SHRINKS):
            w = np.exp(a * (theta - theta.max()))
            diffs[i, halves[other]] = _held_out_losses(prob.fitted, prob.queries, halves[other], w / w.sum()) - base
    mean = diffs.mean(axis=1)
    se = np.array([np.sqrt(np.sum((d - d.mean()) ** 2) / (len(d) - 1) / len(d)) for d in diffs])
    np.testing.assert_allclose([table["gain_by_shrink"][str(a)] for a in SHRINKS], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([table["se_by_shrink"][str(a)] for a in SHRINKS], se, rtol=1e-9, atol=1e-12)
    best = int(np.argmin(mean))
    expected = 0.0
    if mean[best] + se[best] < 0:   # the one-standard-error rule: the smallest shrink within one SE of the best
        expected = min(a for a, m in zip(SHRINKS, mean) if m <= mean[best] + se[best])
    assert table["shrink"] == expected


def test_one_se_rule_prefers_the_smaller_shrink_within_one_standard_error():
    q = np.linspace(-1.0, 1.0, 16)
    diffs = np.stack([0 * q, -1.0 + 0.1 * q, -1.05 + 3.0 * q, -2.01 + 0.1 * q, -2.02 + 0.1 * q])
    alpha, mean, se = one_se_shrink(diffs)
    # 1.0 is best, by 0.01 over 0.75: less than its standard error 0.1 · sd(q) / 4 = 0.016; 0.5 is 0.97 behind
    assert alpha == 0.75
    np.testing.assert_allclose(mean, [0, -1, -1.05, -2.01, -2.02], atol=1e-12)
    np.testing.assert_allclose(se, [0, *(np.std(diffs[1:], axis=1, ddof=1) / 4)], rtol=1e-12)
    assert one_se_shrink(np.stack([0 * q, 0.2 * q - 0.01, 0.2 * q - 0.02, q, q]))[0] == 0.0   # within 1 SE of 0
    assert one_se_shrink(np.stack([0 * q, q + 5, q + 5, q + 5, q + 5]))[0] == 0.0           # every shrink loses


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


def test_auto_is_the_holdout_guard_from_four_learning_queries_and_none_below():
    prob = planted_problem(200, 6, 4, 32, seed=2)
    auto = learn_weights(prob.fitted, prob.queries, k=K, steps=STEPS, guard="auto", progress=False)
    holdout = learn_weights(prob.fitted, prob.queries, k=K, steps=STEPS, guard="holdout", progress=False)
    assert auto.info["guard_mode"] == "holdout" and auto.info["guard_requested"] == "auto"
    np.testing.assert_array_equal(auto.weights, holdout.weights)
    assert auto.info["guard"]["shrink"] == holdout.info["guard"]["shrink"]
    few = learn_weights(prob.fitted, prob.queries[:3], k=K, steps=STEPS, guard="auto", progress=False)
    plain = learn_weights(prob.fitted, prob.queries[:3], k=K, steps=STEPS, progress=False)
    assert few.info["guard_mode"] == "none" and "guard" not in few.info
    np.testing.assert_array_equal(few.weights, plain.weights)
