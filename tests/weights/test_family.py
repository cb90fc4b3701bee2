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
