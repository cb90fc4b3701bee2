"""The λ scale of weights inside the shared kernel: the scores over a grid of c from one eigendecomposition equal a
plain numpy solve per c (primal and dual form, with DAS's row factors); the choice is the c whose scores give the
best family criterion, computed here with plain loops; bad weights and grids are refused."""
from __future__ import annotations

import numpy as np
import pytest

from gradtrace.errors import UserError
from gradtrace.weights.inside_lambda import INSIDE_GRID, choose_inside_c, inside_scores


def _layout(k):
    a, b = k // 3, 2 * k // 3
    return [("a", 0, a), ("b", a, b), ("c", b, k)]


def _data(k, n=40, q=8, seed=0):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, k)) * np.repeat([1.0, 3.0, 0.5], [k // 3, 2 * k // 3 - k // 3, k - 2 * k // 3])
    return phi, rng.normal(size=(q, k)), rng.uniform(0.5, 2.0, size=n)


def _plain(phi, queries, w, c, slices, row_scale=None):
    """TRAK on features whose block j is scaled by √w_j: q D (D G D + c · mean diag(D G D) I)⁻¹ D Φᵀ."""
    d = np.concatenate([np.full(e - s, np.sqrt(wj)) for wj, (_, s, e) in zip(w, slices)])
    x, qx = phi * d, queries * d
    g = x.T @ x
    scores = qx @ np.linalg.solve(g + c * np.mean(np.diag(g)) * np.eye(len(g)), x.T)
    return scores if row_scale is None else scores * row_scale[None, :]


@pytest.mark.parametrize("k", [12, 300])  # primal (k < N) and dual (k > max(N, 256)) forms
@pytest.mark.parametrize("das", [False, True])
def test_scores_over_the_grid_equal_a_plain_solve_per_c(k, das):
    phi, queries, row_scale = _data(k)
    slices, w = _layout(k), np.array([0.6, 0.1, 0.3])
    grid = [1e-3, 0.1, 10.0, 1e3]
    got = list(inside_scores(phi, slices, w, queries, grid, row_scale=row_scale if das else None))
    assert [c for c, _ in got] == grid
    for c, scores in got:
        want = _plain(phi, queries, w, c, slices, row_scale if das else None)
        np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    if k < 40:  # a Gram matrix at hand gives the same scores
        again = dict(inside_scores(phi, slices, w, queries, grid, gram=phi.T @ phi,
                                   row_scale=row_scale if das else None))
        for c, scores in got:
            np.testing.assert_allclose(again[c], scores, rtol=1e-10)


def _criterion(scores, families, k):
    """Within-family minus across-family mean of A(q, q') = (1/k) Σ_{n ∈ top-k(q)} z_q'(n), as plain loops."""
    z = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    top = [np.argsort(-s, kind="stable")[:k] for s in scores]
    same, diff = [], []
    for i in range(len(scores)):
        for j in range(len(scores)):
            if i == j:
                continue
            (same if families[i] == families[j] else diff).append(z[j, top[i]].mean())
    return np.mean(same) - np.mean(diff)


def test_the_choice_is_the_c_of_the_best_family_criterion():
    rng = np.random.default_rng(3)
    phi, queries, _ = _data(12, n=60, q=12, seed=3)
    families = ["x", "y", "z"] * 4
    # queries of a family share a direction in the first group, so some c separates the families best
    centres = {f: rng.normal(size=4) * 3 for f in "xyz"}
    queries[:, :4] += np.array([centres[f] for f in families])
    slices, w = _layout(12), np.array([0.7, 0.2, 0.1])
    grid = [1e-4, 1e-2, 1.0, 100.0, 1e4]
    c, table = choose_inside_c(phi, slices, w, queries, families, k=5, grid=grid)
    want = [-_criterion(_plain(phi, queries, w, g, slices), families, 5) for g in grid]
    np.testing.assert_allclose([loss for _, loss in table], want, rtol=1e-8)
    assert [g for g, _ in table] == grid and c == grid[int(np.argmin(want))]
    assert len(set(np.round(want, 6))) > 1  # the grid's values differ: the choice is not a tie broken by order
    assert INSIDE_GRID[0] == 1e-4 and INSIDE_GRID[-1] == pytest.approx(1e6) and len(INSIDE_GRID) == 21


def test_bad_weights_and_grids_are_refused():
    phi, queries, _ = _data(12)
    slices = _layout(12)
    with pytest.raises(UserError, match="3 finite non-negative"):
        list(inside_scores(phi, slices, [1.0, -1.0, 1.0], queries, [1.0]))
    with pytest.raises(UserError, match="3 finite non-negative"):
        list(inside_scores(phi, slices, [1.0, 1.0], queries, [1.0]))
    with pytest.raises(UserError, match="grid"):
        choose_inside_c(phi, slices, [1.0, 1.0, 1.0], queries, ["a", "a", "b", "b"] * 2, k=3, grid=[0.0, 1.0])
