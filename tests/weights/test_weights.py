"""gradtrace.weights against independent numpy computations (float64, brute force over all rows)."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from gradtrace.errors import UserError
from gradtrace.methods import FittedMethod, get_method
from gradtrace.weights import (
    choose_lambda_scale,
    cosine,
    dense_contributions,
    learn_weights,
    load_weights,
    save_weights,
    snr_loss,
    solo_quality,
)
from gradtrace.weights.noise import psi_stats, query_grams
from gradtrace.weights.pool import CandidatePool
from gradtrace.weights.streamed import snr_at

SLICES = [("a", 0, 3), ("b", 3, 10), ("c", 10, 14), ("d", 14, 22)]


# ---- independent references -------------------------------------------------------------------
def np_contrib(phi_q, psi, slices):
    """c[q, n, j] = φ_j(q) · ψ_j(n) by brute force."""
    phi_q, psi = np.asarray(phi_q, np.float64), np.asarray(psi, np.float64)
    return np.stack([phi_q[:, s:e] @ psi[:, s:e].T for _, s, e in slices], axis=2)


def np_snr(contrib, w, k):
    """mean_q −(mean of the k largest τ) / ‖τ‖ and its gradient in w (top-k held fixed)."""
    losses, grads = [], []
    for c in contrib:
        tau = c @ w
        top = np.argsort(-tau, kind="stable")[:k]
        s, r = tau[top].mean(), np.linalg.norm(tau)
        losses.append(-s / r)
        grads.append(-(c[top].mean(axis=0) / r - s * (c.T @ tau) / r**3))
    return float(np.mean(losses)), np.mean(grads, axis=0)


def planted(n=400, n_q=16, slices=SLICES, signal=1, n_planted=3, strength=9.0, noise=2.5, seed=0):
    """Random φ, ψ with group blocks; in group `signal` each query has its own planted rows."""
    rng = np.random.default_rng(seed)
    dim = slices[-1][2]
    s0, s1 = slices[signal][1], slices[signal][2]
    phi_q = rng.standard_normal((n_q, dim))
    scale = np.full(dim, noise)
    scale[s0:s1] = 1.0
    psi = rng.standard_normal((n, dim)) * scale
    rows = rng.choice(n, size=(n_q, n_planted), replace=False)
    for q in range(n_q):
        psi[rows[q], s0:s1] += strength * phi_q[q, s0:s1] / np.linalg.norm(phi_q[q, s0:s1])
    return phi_q.astype(np.float32), psi.astype(np.float32), rows


def np_recall(phi_q, psi, rows, w, slices, k):
    tau = np_contrib(phi_q, psi, slices) @ w
    top = np.argsort(-tau, axis=1)[:, :k]
    return np.mean([np.isin(r, t).mean() for r, t in zip(rows, top)])


def fitted_of(psi, slices=SLICES):
    return FittedMethod(psi=psi, group_slices=slices, info={})


# ---- the objective ------------------------------------------------------------------------------
def test_snr_loss_matches_numpy_value_and_gradient():
    rng = np.random.default_rng(1)
    contrib = rng.standard_normal((5, 60, 4))
    w = rng.dirichlet(np.ones(4))
    ref, ref_grad = np_snr(contrib, w, k=7)
    wt = torch.tensor(w, requires_grad=True)
    loss = snr_loss(torch.from_numpy(contrib), wt, 7)
    loss.backward()
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(wt.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-14)


def test_snr_loss_is_scale_free():
    rng = np.random.default_rng(2)
    contrib = torch.from_numpy(rng.standard_normal((3, 40, 5)))
    w = torch.from_numpy(rng.dirichlet(np.ones(5)))
    base = snr_loss(contrib, w, 5).item()
    assert snr_loss(contrib * 37.5, w, 5).item() == pytest.approx(base, rel=1e-12)
    assert snr_loss(contrib, w * 0.01, 5).item() == pytest.approx(base, rel=1e-12)


def test_query_grams_equal_brute_force_second_moments():
    phi_q, psi, _ = planted(n=150, n_q=4)
    c = np_contrib(phi_q, psi, SLICES)
    ref = np.einsum("qnj,qnl->qjl", c, c)
    stats = psi_stats(psi, SLICES, chunk_rows=17)
    got = query_grams(phi_q.astype(np.float64), stats.gram, SLICES)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-9 * np.abs(ref).max())
    norms = [np.sqrt((psi[:, s:e].astype(np.float64) ** 2).sum(1)).max() for _, s, e in SLICES]
    np.testing.assert_allclose(stats.group_norm_max, norms, rtol=1e-12)


def test_pool_bound_covers_every_row_outside_the_pool():
    phi_q, psi, _ = planted(n=300, n_q=6, seed=4)
    fitted = fitted_of(psi)
    phi64 = phi_q.astype(np.float64)
    pool = CandidatePool(fitted, phi64, psi_stats(psi, SLICES), size=20, k=5, trigger="exact")
    rng = np.random.default_rng(5)
    w0 = rng.dirichlet(np.ones(4))
    pool.refresh(np.arange(6), w0)
    c = np_contrib(phi_q, psi, SLICES)
    for _ in range(20):
        w = w0 * np.exp(rng.normal(0, 0.3, size=4))
        w /= w.sum()
        tau = c @ w
        outside = np.ones_like(tau, dtype=bool)
        np.put_along_axis(outside, pool.idx, False, axis=1)
        best_outside = np.where(outside, tau, -np.inf).max(axis=1)
        assert (pool.bound(w) >= best_outside).all()


# ---- learning -----------------------------------------------------------------------------------
def test_dense_path_follows_adam_on_the_numpy_objective():
    phi_q, psi, _ = planted(n=200, n_q=8)
    res = learn_weights(fitted_of(psi), phi_q, k=5, steps=3, lr=0.1, l2=0.01, progress=False)
    assert res.info["path"] == "dense"
    # independent Adam on θ with the numpy objective + l2 ‖w‖²
    c = np_contrib(phi_q, psi, SLICES)
    theta, m, v, curve = np.zeros(4), np.zeros(4), np.zeros(4), []
    for t in range(1, 5):
        w = np.exp(theta) / np.exp(theta).sum()
        loss, g_w = np_snr(c, w, 5)
        curve.append(loss + 0.01 * w @ w)
        if t == 4:
            break
        g_w = g_w + 0.02 * w
        g = w * (g_w - w @ g_w)                       # chain rule through the softmax
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        theta = theta - 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(res.loss_curve, curve, rtol=1e-9)
    np.testing.assert_allclose(res.weights, np.exp(theta) / np.exp(theta).sum(), rtol=1e-9)
    assert res.weights.min() >= 0 and res.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert res.info["uniform_loss"] == pytest.approx(np_snr(c, np.full(4, 0.25), 5)[0], rel=1e-12)


def test_scalable_path_equals_dense_path():
    phi_q, psi, _ = planted(n=500, n_q=10, seed=6)
    fitted = fitted_of(psi)
    dense = learn_weights(fitted, phi_q, k=5, steps=40, lr=0.1, l2=0.01, progress=False)
    scal = learn_weights(fitted, phi_q, k=5, steps=40, lr=0.1, l2=0.01, progress=False,
                         memory_budget_bytes=1, pool_size=15, refresh="exact")
    assert (dense.info["path"], scal.info["path"]) == ("dense", "scalable")
    assert scal.info["pool"]["passes"] > 3 and scal.info["pool"]["queries_refreshed"] > 2 * 10  # refreshes happened
    np.testing.assert_allclose(scal.loss_curve, dense.loss_curve, rtol=1e-5)
    np.testing.assert_allclose(scal.weights, dense.weights, atol=1e-6)
    assert dense.weights[1] > 0.5                      # it did move (towards the signal group)
    whole = learn_weights(fitted, phi_q, k=5, steps=40, lr=0.1, l2=0.01, progress=False,
                          memory_budget_bytes=1, pool_size=10_000)   # the pool holds every row
    assert whole.info["pool"]["passes"] == 1
    np.testing.assert_allclose(whole.loss_curve, dense.loss_curve, rtol=1e-5)


@pytest.mark.parametrize("refresh", ["exact", "fast"])
def test_final_loss_is_the_objective_at_the_returned_weights(refresh):
    phi_q, psi, _ = planted(n=400, n_q=8, seed=7)
    fitted = fitted_of(psi)
    res = learn_weights(fitted, phi_q, k=5, steps=25, lr=0.1, progress=False, memory_budget_bytes=1,
                        pool_size=12, refresh=refresh)
    ref, _ = np_snr(np_contrib(phi_q, psi, SLICES), res.weights, 5)
    assert res.info["final_loss"] == pytest.approx(ref, rel=1e-5)
    assert res.info["final_loss"] == pytest.approx(snr_at(fitted, phi_q.astype(np.float64), 5, res.weights), rel=1e-9)


def test_planted_signal_group_gets_the_weight_and_recovers_the_items():
    slices = [(f"g{j}", 4 * j, 4 * j + 4) for j in range(5)] + [("sig", 20, 32)]
    phi_q, psi, rows = planted(n=1500, n_q=40, slices=slices, signal=5, n_planted=4, strength=7.0, noise=2.0,
                               seed=8)
    res = learn_weights(fitted_of(psi, slices), phi_q[:20], k=10, progress=False)
    assert int(np.argmax(res.weights)) == 5 and res.weights[5] > 0.5
    uniform = np_recall(phi_q[20:], psi, rows[20:], np.full(6, 1 / 6), slices, 10)
    learned = np_recall(phi_q[20:], psi, rows[20:], res.weights, slices, 10)   # held-out queries
    assert learned >= 0.95 and uniform <= 0.5 and learned - uniform >= 0.45


def test_learning_is_deterministic():
    phi_q, psi, _ = planted(n=200, n_q=6)
    runs = [learn_weights(fitted_of(psi), phi_q, k=5, steps=15, progress=False, memory_budget_bytes=1,
                          pool_size=10) for _ in range(2)]
    assert runs[0].loss_curve == runs[1].loss_curve
    np.testing.assert_array_equal(runs[0].weights, runs[1].weights)


@pytest.mark.parametrize("kwargs, msg", [
    ({"k": 0}, "k must be"), ({"k": 10_000}, "larger than the training set"), ({"steps": -1}, "steps"),
    ({"lr": 0.0}, "lr"), ({"l2": float("nan")}, "l2"), ({"refresh": "sometimes"}, "unknown refresh"),
    ({"memory_budget_bytes": 1, "pool_size": 3}, "pool_size"),
])
def test_bad_arguments_raise_user_errors(kwargs, msg):
    phi_q, psi, _ = planted(n=100, n_q=3)
    with pytest.raises(UserError, match=msg):
        learn_weights(fitted_of(psi), phi_q, progress=False, **kwargs)


def test_bad_queries_raise_user_errors():
    phi_q, psi, _ = planted(n=100, n_q=3)
    with pytest.raises(UserError, match="columns"):
        learn_weights(fitted_of(psi), phi_q[:, :5], progress=False)
    bad = phi_q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(UserError, match="NaN"):
        learn_weights(fitted_of(psi), bad, progress=False)
    with pytest.raises(UserError, match="FittedMethod"):
        learn_weights(psi, phi_q, progress=False)


# ---- λ scale ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["shared", "per-group"])
def test_choose_lambda_scale_is_the_grid_minimiser(kernel):
    rng = np.random.default_rng(9)
    scale = np.repeat([3.0, 1.0, 0.3, 1.5], [3, 7, 4, 8])
    phi = (rng.standard_normal((120, 22)) * scale).astype(np.float32)
    queries = (rng.standard_normal((7, 22)) * scale).astype(np.float32)
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    best, table = choose_lambda_scale(phi, SLICES, queries, kernel=kernel, grid=grid, k=5)
    p, q = phi.astype(np.float64), queries.astype(np.float64)
    spans = [(0, 22)] if kernel == "shared" else [(s, e) for _, s, e in SLICES]
    ref = []
    for c in grid:
        scores = np.zeros((7, 120))
        for s, e in spans:
            g = p[:, s:e].T @ p[:, s:e]
            kinv = np.linalg.inv(g + c * np.trace(g) / (e - s) * np.eye(e - s))
            scores += q[:, s:e] @ kinv @ p[:, s:e].T
        ref.append(np_snr(scores[:, :, None], np.ones(1), 5)[0])
    assert [c for c, _ in table] == grid
    np.testing.assert_allclose([loss for _, loss in table], ref, rtol=1e-6)
    assert best == grid[int(np.argmin(ref))]
    assert list(inspect.signature(choose_lambda_scale).parameters)[:3] == [
        "train_features", "group_slices", "learning_query_features"]
    assert not any("eval" in name for name in inspect.signature(choose_lambda_scale).parameters)


def test_choose_lambda_scale_refuses_a_method_without_lambda():
    phi_q, psi, _ = planted(n=50, n_q=3)
    with pytest.raises(UserError, match="no λ"):
        choose_lambda_scale(psi, SLICES, phi_q, method="tracin", grid=[0.1])
    with pytest.raises(UserError, match="grid"):
        choose_lambda_scale(psi, SLICES, phi_q, grid=[0.1, -1.0])


# ---- artefact -----------------------------------------------------------------------------------
def test_save_load_round_trip_and_refusals(tmp_path):
    phi_q, psi, _ = planted(n=120, n_q=4)
    res = learn_weights(fitted_of(psi), phi_q, k=5, steps=5, progress=False)
    prov = {"base_method": {"name": "trak", "c": 0.01}, "learning_queries": "gen-v1"}
    path = save_weights(tmp_path / "w.json", res, prov)
    w, doc = load_weights(path, ["a", "b", "c", "d"])
    np.testing.assert_array_equal(w, res.weights)
    assert doc["provenance"] == prov and doc["learning"]["k"] == 5
    assert doc["learning"]["first_loss"] == res.loss_curve[0] and doc["learning"]["last_loss"] == res.loss_curve[-1]
    w_rev, _ = load_weights(path, ["d", "c", "b", "a"])
    np.testing.assert_array_equal(w_rev, res.weights[::-1])
    with pytest.raises(UserError, match="other parameter groups"):
        load_weights(path, ["a", "b", "c"])
    with pytest.raises(UserError, match="other parameter groups"):
        load_weights(path, ["a", "b", "c", "e"])
    broken = json.loads(path.read_text())
    broken["weights"]["b"] = -0.5
    (tmp_path / "neg.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match="invalid weight"):
        load_weights(tmp_path / "neg.json", ["a", "b", "c", "d"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_weights(tmp_path / "bad.json", ["a", "b", "c", "d"])
    (tmp_path / "other.json").write_text(json.dumps({"format": "something/1"}))
    with pytest.raises(UserError, match="not a gradtrace weights file"):
        load_weights(tmp_path / "other.json", ["a", "b", "c", "d"])
    with pytest.raises(UserError, match="JSON-serialisable"):
        save_weights(tmp_path / "x.json", res, {"f": object()})


# ---- diagnostics --------------------------------------------------------------------------------
def test_solo_quality_and_cosine_match_numpy():
    phi_q, psi, _ = planted(n=250, n_q=5, seed=10)
    got = solo_quality(fitted_of(psi), phi_q, k=6, chunk_rows=33)
    c = np_contrib(phi_q, psi, SLICES)
    ref = [np_snr(c, np.eye(4)[j], 6)[0] for j in range(4)]
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert int(np.argmin(got)) == 1                       # the planted group is the best alone
    a, b = np.array([0.1, 0.2, 0.7]), np.array([0.3, 0.3, 0.4])
    assert cosine(a, b) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
    with pytest.raises(UserError, match="different lengths"):
        cosine(a, b[:2])


def test_dense_contributions_and_trak_fitted_method_agree_with_numpy():
    rng = np.random.default_rng(11)
    phi = rng.standard_normal((80, 22)).astype(np.float32)
    fitted = get_method("trak", c=0.1, kernel="per-group").fit(phi, SLICES)
    q = rng.standard_normal((3, 22))
    got = dense_contributions(fitted, q, chunk_rows=7)
    np.testing.assert_allclose(got, np_contrib(q, fitted.psi, SLICES), rtol=1e-10, atol=1e-12)


def test_planted_problem_and_recall_match_numpy():
    from gradtrace.weights.planted import planted_problem, planted_recall

    prob = planted_problem(300, 6, 5, 40, signal_dim=12, strength=8.0, seed=12)
    assert [s[2] - s[1] for s in prob.fitted.group_slices] == [12, 7, 7, 7, 7]
    assert len(np.unique(prob.planted)) == prob.planted.size           # different rows for every query
    w = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    ref = np_recall(prob.queries, prob.fitted.psi, prob.planted, w, prob.fitted.group_slices, 10)
    assert planted_recall(prob.fitted, prob.queries, prob.planted, w, 10) == pytest.approx(ref, abs=1e-12)
