"""The lazy scalable learner (the default) against float64 brute force and the dense reference path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtrace.methods import FittedMethod
from gradtrace.weights import learn_weights
from gradtrace.weights.noise import gram_matvec, query_grams
from gradtrace.weights.psi_passes import (
    PsiSource,
    psi_stats_fast,
    query_grams_fast,
    top_pass,
)

SLICES = [("a", 0, 3), ("b", 3, 10), ("c", 10, 14), ("d", 14, 22)]


def planted(n=400, n_q=16, signal=1, n_planted=3, strength=9.0, noise=2.5, seed=0):
    """Random φ, ψ with group blocks; in group `signal` each query has its own planted rows."""
    rng = np.random.default_rng(seed)
    s0, s1 = SLICES[signal][1], SLICES[signal][2]
    phi_q = rng.standard_normal((n_q, 22))
    scale = np.full(22, noise)
    scale[s0:s1] = 1.0
    psi = rng.standard_normal((n, 22)) * scale
    rows = rng.choice(n, size=(n_q, n_planted), replace=False)
    for q in range(n_q):
        psi[rows[q], s0:s1] += strength * phi_q[q, s0:s1] / np.linalg.norm(phi_q[q, s0:s1])
    return phi_q.astype(np.float32), psi.astype(np.float32)


def brute(phi_q, psi, w, k):
    """(top-k rows per query, ties to the lower index; mean_q −signal/noise) in float64."""
    c = np.stack([phi_q[:, s:e].astype(np.float64) @ psi[:, s:e].T.astype(np.float64) for _, s, e in SLICES], 2)
    tau = c @ w
    top = np.stack([np.lexsort((np.arange(tau.shape[1]), -t))[:k] for t in tau])
    signal = np.take_along_axis(tau, top, 1).mean(1)
    return top, float(np.mean(-signal / np.linalg.norm(tau, axis=1)))


def final_topk(psi, phi_q, w, k):
    """The returned weights' top-k as the learner's last step selects it."""
    from gradtrace.weights.lazy import LazyObjective
    obj = LazyObjective(FittedMethod(psi=psi, group_slices=SLICES, info={}), phi_q.astype(np.float64), k=k,
                        pool_size=12)
    loss = float(obj(torch.from_numpy(w), last=True))
    return obj.pool.final_rows, loss, obj.pool


def test_kernels_equal_float64_brute_force():
    phi_q, psi = planted(n=300, n_q=5, seed=1)
    source = PsiSource(psi, torch.device("cpu"), chunk_rows=37)
    stats = psi_stats_fast(source, SLICES)
    ref = psi.astype(np.float64).T @ psi.astype(np.float64)
    np.testing.assert_allclose(stats.gram, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    norms = np.sqrt((psi.astype(np.float64) ** 2).sum(1)).max()
    assert norms <= stats.norm_max <= norms * (1 + 1e-4)
    phi64 = phi_q.astype(np.float64)
    grams = query_grams_fast(phi64, ref, SLICES)
    assert grams.dtype == np.float32                              # stored rounded: half the bytes per step
    np.testing.assert_allclose(grams, query_grams(phi64, ref, SLICES), rtol=2.0 ** -24, atol=0)
    w = np.array([0.1, 0.5, 0.15, 0.25])
    gw = gram_matvec(torch.from_numpy(grams), torch.from_numpy(w), block=2).numpy()   # float64 sums
    np.testing.assert_allclose(gw, np.einsum("qjl,l->qj", grams.astype(np.float64), w), rtol=1e-14)
    qw = phi64 * np.repeat(w, [3, 7, 4, 8])
    tau = qw @ psi.astype(np.float64).T
    for rows, take in ((37, 9), (4, 9), (300, 9), (37, 300)):   # chunks larger, smaller than take; one chunk; all
        idx, vals = top_pass(PsiSource(psi, torch.device("cpu"), chunk_rows=rows), qw, take)
        np.testing.assert_array_equal(idx, np.argsort(-tau, axis=1)[:, :take])
        np.testing.assert_allclose(vals, np.take_along_axis(tau, idx, 1), rtol=1e-5, atol=1e-6 * np.abs(tau).max())


def test_default_path_is_lazy_and_its_end_is_exact():
    phi_q, psi = planted(n=600, n_q=12, seed=2)
    fitted = FittedMethod(psi=psi, group_slices=SLICES, info={})
    res = learn_weights(fitted, phi_q, k=5, steps=40, lr=0.1, progress=False, memory_budget_bytes=1, pool_size=12)
    assert res.info["path"] == "scalable" and res.info["pool"]["refresh"] == "lazy"
    assert res.info["pool"]["passes"] >= 3                       # refreshed on the schedule, not every step
    top, loss = brute(phi_q, psi, res.weights, 5)
    assert res.info["final_loss"] == pytest.approx(loss, rel=1e-6)
    assert res.loss_curve[-1] == pytest.approx(loss, rel=1e-6)
    rows, again, _ = final_topk(psi, phi_q, res.weights, 5)
    assert again == pytest.approx(loss, rel=1e-6)
    np.testing.assert_array_equal(np.sort(rows, 1), np.sort(top, 1))


def test_lazy_path_stays_close_to_the_dense_reference():
    phi_q, psi = planted(n=800, n_q=10, seed=6)
    fitted = FittedMethod(psi=psi, group_slices=SLICES, info={})
    kw = {"k": 5, "steps": 60, "lr": 0.1, "l2": 0.01, "progress": False}
    dense = learn_weights(fitted, phi_q, **kw)
    lazy = learn_weights(fitted, phi_q, memory_budget_bytes=1, pool_size=40, **kw)
    assert (dense.info["path"], lazy.info["path"]) == ("dense", "scalable")
    assert dense.weights[1] > 0.5                                  # it did move (towards the signal group)
    assert lazy.info["pool"]["rollbacks"] >= 1                     # a miss was found and undone
    assert lazy.info["pool"]["shortlist_rollbacks"] >= 1           # and one outside a step's shortlist
    assert lazy.info["pool"]["passes"] == 3                        # steps 0, 32 and the last
    np.testing.assert_allclose(lazy.loss_curve, dense.loss_curve, rtol=1e-6)
    np.testing.assert_allclose(lazy.weights, dense.weights, atol=1e-7)
    assert lazy.info["final_loss"] == pytest.approx(dense.info["final_loss"], rel=1e-7)
    whole = learn_weights(fitted, phi_q, memory_budget_bytes=1, pool_size=10_000, **kw)  # every row in the pool
    assert whole.info["pool"]["passes"] == 1
    np.testing.assert_allclose(whole.loss_curve, dense.loss_curve, rtol=1e-6)
    np.testing.assert_allclose(whole.weights, dense.weights, atol=1e-7)


def test_ties_at_the_pool_edge_fall_back_to_float64_with_lower_index_first():
    phi_q, psi = planted(n=200, n_q=4, seed=3)
    w = np.array([0.2, 0.4, 0.1, 0.3])
    top, _ = brute(phi_q, psi, w, 6)
    psi = np.concatenate([psi, psi[top[:, 5]]])                   # a copy of each query's 6th best row
    top, loss = brute(phi_q, psi, w, 6)
    # pool_size = k: the (k+1)-th score equals the k-th, so no float32 certificate can hold
    from gradtrace.weights.lazy import LazyObjective
    obj = LazyObjective(FittedMethod(psi=psi, group_slices=SLICES, info={}), phi_q.astype(np.float64), k=6,
                        pool_size=6)
    got = float(obj(torch.from_numpy(w), last=True))
    assert obj.pool.float64_fallbacks >= 1
    assert got == pytest.approx(loss, rel=1e-6)
    np.testing.assert_array_equal(np.sort(obj.pool.final_rows, 1), np.sort(top, 1))


def test_a_shortlist_of_only_k_rows_still_follows_the_dense_path(monkeypatch):
    # each step sees only the k rows chosen at the last check: the checks find misses and roll back
    import gradtrace.weights.shortlist as shortlist
    monkeypatch.setattr(shortlist, "PER_K", 1)
    phi_q, psi = planted(n=800, n_q=10, seed=6)
    fitted = FittedMethod(psi=psi, group_slices=SLICES, info={})
    kw = {"k": 5, "steps": 60, "lr": 0.1, "l2": 0.01, "progress": False}
    dense = learn_weights(fitted, phi_q, **kw)
    lazy = learn_weights(fitted, phi_q, memory_budget_bytes=1, pool_size=40, **kw)
    pool = lazy.info["pool"]
    assert pool["shortlist"] == 5 and pool["shortlist_rollbacks"] >= 10 and pool["shortlist_unresolved"] == 0
    np.testing.assert_allclose(lazy.loss_curve, dense.loss_curve, rtol=1e-6)
    np.testing.assert_allclose(lazy.weights, dense.weights, atol=1e-7)
    assert lazy.info["final_loss"] == pytest.approx(dense.info["final_loss"], rel=1e-7)


def test_threads_context_sets_and_restores_torch_and_blas():
    from threadpoolctl import threadpool_info

    from gradtrace.weights.threads import threads
    before = torch.get_num_threads()
    blas_before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    with threads(1):
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert torch.get_num_threads() == before
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == blas_before
