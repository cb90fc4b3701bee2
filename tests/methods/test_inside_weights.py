"""Group weights inside the shared TRAK kernel: K_w = D (D ΦᵀΦ D + λ_w I)⁻¹ D equals TRAK fitted on features whose
block j is scaled by √w_j (a plain numpy solve), for TRAK and DAS; uniform weights leave the scores unchanged;
the per-group kernel and bad weights are refused."""
from __future__ import annotations

import numpy as np
import pytest

from gradtrace.errors import UserError
from gradtrace.methods import configure

SLICES = [("a", 0, 6), ("b", 6, 10), ("c", 10, 16)]


def _data(seed=0, n=40, q=5):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, 16)) * np.repeat([1.0, 3.0, 0.5], [6, 4, 6])
    return phi, rng.normal(size=(q, 16)), rng.uniform(0.5, 2.0, size=n)


def _plain(phi, queries, w, c, row_scale=None):
    d = np.concatenate([np.full(e - s, np.sqrt(w[name])) for name, s, e in SLICES])
    x, qx = phi * d, queries * d
    g = x.T @ x
    k = np.linalg.inv(g + c * np.mean(np.diag(g)) * np.eye(len(g)))
    scores = qx @ k @ x.T
    return scores if row_scale is None else scores * row_scale[None, :]


@pytest.mark.parametrize("name", ["trak", "das"])
def test_inside_weights_equal_trak_on_scaled_features(name):
    phi, queries, row_scale = _data()
    w = {"a": 0.7, "b": 0.05, "c": 0.25}
    base = configure(name, kernel="shared", c=0.1).with_feature_weights(w)
    kw = {"row_scale": row_scale} if name == "das" else {}
    fitted = base.fit(phi, SLICES, **kw)
    want = _plain(phi, queries, w, 0.1, row_scale if name == "das" else None)
    np.testing.assert_allclose(fitted.scores(queries), want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
    assert fitted.info["feature_weights"] == w and base.with_c(0.5).feature_weights == w
    if name == "trak":  # the query-side mode applies the same kernel to the queries
        side = base.fit(phi, SLICES, query_side=True)
        np.testing.assert_allclose(side.scores(queries), want, rtol=2e-5, atol=1e-6 * np.abs(want).max())


def test_uniform_inside_weights_change_nothing_and_zero_weights_drop_a_group():
    phi, queries, _ = _data(1)
    plain = configure("trak", kernel="shared", c=0.01).fit(phi, SLICES).scores(queries)
    uniform = configure("trak", kernel="shared", c=0.01).with_feature_weights({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    np.testing.assert_allclose(uniform.fit(phi, SLICES).scores(queries), plain, rtol=1e-4,
                               atol=1e-6 * np.abs(plain).max())
    w = {"a": 0.5, "b": 0.0, "c": 0.5}
    dropped = configure("trak", kernel="shared", c=0.01).with_feature_weights(w).fit(phi, SLICES).scores(queries)
    keep = np.r_[0:6, 10:16]
    x, qx = phi[:, keep], queries[:, keep]
    g = x.T @ x
    # mean diag over all 16 columns, the zero block included: λ_w = c · trace(D G D) / k
    lam = 0.01 * np.trace(g) * 0.5 / 16
    want = qx @ np.linalg.inv(0.5 * g + lam * np.eye(12)) @ x.T * 0.5
    np.testing.assert_allclose(dropped, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("kernel, weights, message", [
    ("per-group", {"a": 1.0, "b": 1.0, "c": 1.0}, "need kernel='shared'"),
    ("shared", {"a": -1.0, "b": 1.0, "c": 1.0}, ">= 0 and not all zero"),
    ("shared", {"a": 0.0, "b": 0.0, "c": 0.0}, ">= 0 and not all zero"),
])
def test_refusals(kernel, weights, message):
    with pytest.raises(UserError, match=message):
        configure("trak", kernel=kernel).with_feature_weights(weights)


def test_weights_must_name_the_groups():
    phi, _, _ = _data()
    with pytest.raises(UserError, match="name exactly the features' groups"):
        configure("trak", kernel="shared").with_feature_weights({"a": 1.0, "b": 1.0}).fit(phi, SLICES)


def test_inside_weights_in_the_dual_form_equal_the_primal_solve():
    """A shared block wider than the training set (k > N, the dual form) gives the same scores."""
    rng = np.random.default_rng(3)
    slices = [("a", 0, 200), ("b", 200, 300)]
    phi, queries = rng.normal(size=(20, 300)), rng.normal(size=(4, 300))
    w = {"a": 0.8, "b": 0.2}
    fitted = configure("trak", kernel="shared", c=0.05).with_feature_weights(w).fit(phi, slices)
    assert fitted.info.get("dual_blocks") == ["all"]
    d = np.r_[np.full(200, np.sqrt(0.8)), np.full(100, np.sqrt(0.2))]
    x, qx = phi * d, queries * d
    g = x.T @ x
    want = qx @ np.linalg.solve(g + 0.05 * np.mean(np.diag(g)) * np.eye(300), x.T)
    np.testing.assert_allclose(fitted.scores(queries), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
