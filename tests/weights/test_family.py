"""The family objective: its value against a plain loop over query pairs, its gradient against finite
differences, and what it learns on a planted case (a group whose top-k follows the family's shared value)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtrace.errors import UserError
from gradtrace.weights.family import family_codes, family_loss


def _by_hand(contrib, w, fam, k, beta):
    tau = contrib @ w
    z = tau / np.linalg.norm(tau, axis=1, keepdims=True)
    top = [list(np.argsort(-t, kind="stable")[:k]) for t in tau]
    same, diff, diag = [], [], []
    for q in range(len(tau)):
        for r in range(len(tau)):
            a = float(np.mean([z[r, n] for n in top[q]]))
            if q == r:
                diag.append(a)
            elif fam[q] == fam[r]:
                same.append(a)
            else:
                diff.append(a)
    return -(np.mean(same) - np.mean(diff)) - beta * np.mean(diag)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_value_and_gradient(beta):
    rng = np.random.default_rng(0)
    contrib = rng.normal(size=(6, 20, 4))
    fam = family_codes(["a", "a", "b", "b", None, "a"])
    w = np.array([0.1, 0.2, 0.3, 0.4])
    wt = torch.tensor(w, requires_grad=True)
    loss = family_loss(torch.from_numpy(contrib), wt, fam, 3, beta)
    assert loss.item() == pytest.approx(_by_hand(contrib, w, fam, 3, beta), rel=1e-12)
    loss.backward()
    eps = 1e-6
    for j in range(4):  # top-k sets are constants for the gradient: finite differences at fixed top-k
        up, dn = w.copy(), w.copy()
        up[j] += eps
        dn[j] -= eps
        fd = (float(family_loss(torch.from_numpy(contrib), torch.tensor(up), fam, 3, beta))
              - float(family_loss(torch.from_numpy(contrib), torch.tensor(dn), fam, 3, beta))) / (2 * eps)
        assert wt.grad[j].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_planted_group_wins():
    """Group 0 ranks the family's 5 own examples first; group 1 ranks examples by a varied aspect; group 2 is
    noise. Learned weights move to group 0."""
    from gradtrace.weights.learn import optimise_weights
    from gradtrace.weights.objective import softmax_weights

    rng = np.random.default_rng(1)
    Q, N = 12, 40
    fam = np.repeat(np.arange(3), 4)
    other = rng.integers(0, 4, Q)
    c = rng.normal(scale=0.1, size=(Q, N, 3))
    for q in range(Q):
        c[q, fam[q] * 5:(fam[q] + 1) * 5, 0] += 1.0
        c[q, 20 + other[q] * 5:20 + (other[q] + 1) * 5, 1] += 1.0
    t = torch.from_numpy(c)
    opts = {"k": 5, "steps": 100, "lr": 0.05, "l2": 0.0, "seed": 0}
    theta, curve, _ = optimise_weights(lambda: ((lambda w, last=False: family_loss(t, w, fam, 5)), "dense"),
                                (Q, N, 3), opts, False)
    w = softmax_weights(torch.from_numpy(theta)).numpy()
    assert w[0] > 0.6 and w[0] > w[1] and w[0] > w[2] and curve[-1] < curve[0]


def test_families_must_repeat():
    with pytest.raises(UserError, match="at least two learning queries sharing a value"):
        family_codes(["a", "b", "c"])


def _planted_scores(signal: float, seed: int = 2, q: int = 24, n: int = 60):
    """(Q, N) scores: queries of family f score the block of examples f*10..f*10+9 higher by `signal`."""
    rng = np.random.default_rng(seed)
    fam = np.repeat(np.arange(4), q // 4)
    scores = rng.normal(size=(q, n))
    for i, f in enumerate(fam):
        scores[i, f * 10:(f + 1) * 10] += signal
    return scores, fam


def test_family_signal_is_the_criterion_and_its_permutation_p_value():
    """The criterion equals minus the family objective at one group of weight 1 (the plain loop above); the p-value
    counts, by hand, the shuffles of the family values (the same seeded generator) at or above it."""
    from gradtrace.weights.family import family_signal

    scores, fam = _planted_scores(0.3)
    crit, p = family_signal(scores, list(fam), 5, permutations=200, seed=7)
    assert crit == pytest.approx(-_by_hand(scores[:, :, None], np.ones(1), fam, 5, 0.0), rel=1e-12)
    rng = np.random.default_rng(7)
    beyond = sum(-_by_hand(scores[:, :, None], np.ones(1), rng.permutation(fam), 5, 0.0) >= crit - 1e-15
                 for _ in range(200))
    assert p == pytest.approx((1 + beyond) / 201)
    planted, fam3 = _planted_scores(3.0)
    assert family_signal(planted, list(fam3), 5, permutations=200)[1] == pytest.approx(1 / 201)  # none reach it
    none = family_signal(np.random.default_rng(3).normal(size=(24, 60)), list(fam), 5, permutations=200)
    assert none[1] > 0.05                                       # pure noise: no signal at this seed


def test_without_a_family_signal_the_weights_stay_uniform():
    """Noise scores: `learn_family_weights` keeps uniform weights (no steps) and records the test; with a planted
    signal, or `signal_p=None`, it learns."""
    from gradtrace.methods import configure
    from gradtrace.weights.family import family_signal, learn_family_weights

    rng = np.random.default_rng(4)
    phi = rng.normal(size=(30, 6))
    slices = [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)]
    fitted = configure("trak", kernel="per-group", c=0.1).fit(phi, slices)
    queries = rng.normal(size=(12, 6))
    fam = ["x", "y", "z"] * 4
    crit, p = family_signal(fitted.scores(queries), fam, 5)
    assert p > 0.05, p  # this draw carries no family signal
    kept = learn_family_weights(fitted, queries, fam, k=5, steps=20, lr=0.05, l2=0.0, progress=False)
    np.testing.assert_allclose(kept.weights, np.full(3, 1 / 3))
    sig = kept.info["family_signal"]
    assert not sig["learned"] and sig["p_value"] == pytest.approx(p) and sig["criterion"] == pytest.approx(crit)
    assert len(kept.loss_curve) == 1
    forced = learn_family_weights(fitted, queries, fam, k=5, steps=20, lr=0.05, l2=0.0, progress=False,
                                  signal_p=None)
    assert forced.info["family_signal"]["learned"] and not np.allclose(forced.weights, 1 / 3)
