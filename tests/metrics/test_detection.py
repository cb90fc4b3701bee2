"""Mislabel detection's model-free parts against independent computations: label flips (seeded, never the true
label, uniform over the others), self-influence = the diagonal of a dense numpy Φ K Φᵀ (TracIn, TRAK with a shared
and a per-group kernel, with group weights, Ψ stored or applied on the query side), ROC AUC = sklearn's
roc_auc_score, the top-10% fraction = a direct count, and the paired bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gradtrace.errors import UserError
from gradtrace.evaluate.flips import bilinear_self_influence, flip_labels
from gradtrace.methods import configure
from gradtrace.metrics.detection import detection_table, roc_auc, top_count, top_found

SLICES = [("a", 0, 5), ("b", 5, 8), ("c", 8, 14)]


def dense_kernel(phi: np.ndarray, method: str, kernel: str, c: float) -> np.ndarray:
    """K built explicitly: I (TracIn), (ΦᵀΦ + λI)⁻¹ (shared) or blockdiag_j (Φ_jᵀΦ_j + λ_j I)⁻¹, λ = c·mean diag."""
    k = phi.shape[1]
    if method == "tracin":
        return np.eye(k)
    blocks = [(0, k)] if kernel == "shared" else [(s, e) for _, s, e in SLICES]
    out = np.zeros((k, k))
    for s, e in blocks:
        g = phi[:, s:e].T @ phi[:, s:e]
        out[s:e, s:e] = np.linalg.inv(g + c * np.mean(np.diag(g)) * np.eye(e - s))
    return out


@pytest.mark.parametrize("method,kernel", [("tracin", "shared"), ("trak", "shared"), ("trak", "per-group")])
@pytest.mark.parametrize("query_side", [False, True])
def test_self_influence_is_the_diagonal_of_the_dense_scores(method, kernel, query_side):
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(40, 14)) * rng.uniform(0.2, 3.0, size=14)
    c = 0.05
    base = configure(method, kernel=kernel, c=c)
    fitted = base.fit(phi.astype(np.float32), SLICES, query_side=query_side) if base.uses_lambda and query_side \
        else base.fit(phi.astype(np.float32), SLICES)
    got = bilinear_self_influence(fitted, phi.astype(np.float32), chunk_rows=7)  # several row chunks
    phi32 = phi.astype(np.float32).astype(np.float64)
    kmat = dense_kernel(phi32, method, kernel, c)
    assert got.shape == (40, 3)
    for j, (_, s, e) in enumerate(SLICES):  # c_j(n, n) = φ_j(x_n) · (Φ K)_j(x_n)
        want = np.diag(phi32[:, s:e] @ (phi32 @ kmat)[:, s:e].T)
        np.testing.assert_allclose(got[:, j], want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
    w = np.array([0.2, 0.5, 0.3])
    scale = np.concatenate([np.full(e - s, w[j]) for j, (_, s, e) in enumerate(SLICES)])
    want_w = np.diag((phi32 * scale) @ kmat @ phi32.T)  # weights on the query side: τ_w(n, n)
    np.testing.assert_allclose(got @ w, want_w, rtol=2e-4, atol=1e-6 * np.abs(want_w).max())


def test_self_influence_refuses_other_features():
    fitted = configure("tracin").fit(np.ones((4, 14), dtype=np.float32), SLICES)
    with pytest.raises(UserError, match="shape"):
        bilinear_self_influence(fitted, np.ones((5, 14), dtype=np.float32))


def test_flips_are_seeded_never_the_true_label_and_uniform_over_the_others():
    labels = np.random.default_rng(1).integers(0, 5, size=1000)
    noisy, flipped = flip_labels(labels, 5, fraction=0.1, seed=3)
    again, flipped_again = flip_labels(labels, 5, fraction=0.1, seed=3)
    other, flipped_other = flip_labels(labels, 5, fraction=0.1, seed=4)
    assert np.array_equal(noisy, again) and np.array_equal(flipped, flipped_again)
    assert not np.array_equal(flipped, flipped_other)
    assert flipped.sum() == 100
    assert np.all(noisy[flipped] != labels[flipped]) and np.array_equal(noisy[~flipped], labels[~flipped])
    # many draws: every one of the C − 1 other classes is about equally likely (offsets 1..4)
    big = np.zeros(20000, dtype=np.int64)
    noisy, flipped = flip_labels(big, 5, fraction=0.5, seed=0)
    counts = np.bincount(noisy[flipped], minlength=5)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / flipped.sum() - 0.25) < 0.02)
    two, f2 = flip_labels(np.array([0, 1, 0, 1, 1]), 2, fraction=0.4, seed=0)  # two classes: the other one
    assert f2.sum() == 2 and np.all(two[f2] == 1 - np.array([0, 1, 0, 1, 1])[f2])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, "x"])
def test_flip_fraction_outside_the_open_interval_is_refused(fraction):
    with pytest.raises(UserError, match="between 0 and 1"):
        flip_labels(np.arange(10) % 3, 3, fraction=fraction)


def test_auc_equals_sklearn_and_top_found_a_direct_count():
    rng = np.random.default_rng(2)
    positive = rng.random(300) < 0.1
    scores = rng.normal(size=300) + 1.5 * positive
    scores[:40] = np.round(scores[:40])  # ties
    assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    k = top_count(300, 0.1)
    assert k == 30
    top = np.argsort(-scores, kind="stable")[:k]
    assert top_found(scores, positive, 0.1) == pytest.approx(np.isin(np.flatnonzero(positive), top).mean())
    assert top_found(np.where(positive, 1.0, 0.0), positive, 0.1) == pytest.approx(min(1.0, 30 / positive.sum()))


def test_detection_table_points_and_paired_bootstrap():
    rng = np.random.default_rng(5)
    positive = rng.random(200) < 0.1
    a = rng.normal(size=200) + positive
    b = a + 2.0 * positive * rng.random(200)  # better at finding the positives
    doc = detection_table({"uniform": a, "learned": b}, positive, baseline="uniform", n_bootstrap=300, seed=1)
    assert doc["scores"]["uniform"]["auc"] == pytest.approx(roc_auc_score(positive, a))
    assert doc["scores"]["learned"]["top_found"] == pytest.approx(top_found(b, positive))
    d = doc["paired"]["learned - uniform"]
    assert d["auc"] == pytest.approx(roc_auc_score(positive, b) - roc_auc_score(positive, a))
    assert d["auc_ci95"][0] > 0  # the same resampled examples for both: the improvement is clear
    lo, hi = doc["scores"]["uniform"]["auc_ci95"]
    assert lo < doc["scores"]["uniform"]["auc"] < hi
    same = detection_table({"uniform": a, "learned": a.copy()}, positive, baseline="uniform", n_bootstrap=50)
    assert same["paired"]["learned - uniform"]["auc_ci95"] == [0.0, 0.0]
    again = detection_table({"uniform": a, "learned": b}, positive, baseline="uniform", n_bootstrap=300, seed=1)
    assert again == doc
