"""gradtrace.methods numerics and edge cases (ill-conditioning, rank deficiency, zero groups, NaN rows, bad
layouts, the query-side and dual forms, per-group damping) against numpy closed forms."""
from __future__ import annotations

import numpy as np
import pytest

import gradtrace.methods.trak as trak_module
from fixtures.method_refs import (
    BLOCKS,
    SLICES,
    K,
    N,
    inv_reg,
    ref_trak_per_group_terms,
    ref_trak_shared,
    rel_err,
)
from gradtrace.errors import UserError
from gradtrace.methods import TRAK, FittedMethod, TracIn, get_method


# ---- numerics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1e-4, 1e-2])
def test_float32_ill_conditioned_close_to_float64_reference(c):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((N, 1))
    phi = (base + 1e-3 * rng.standard_normal((N, K))).astype(np.float32)  # nearly collinear columns
    q = (rng.standard_normal((4, 1)) + 1e-3 * rng.standard_normal((4, K))).astype(np.float32)
    p = phi.astype(np.float64)
    assert np.linalg.cond(p.T @ p) > 1e7
    for kernel in ("shared", "per-group"):
        s = TRAK(c=c, kernel=kernel).fit(phi, SLICES, chunk_rows=23).scores(q)
        expected = ref_trak_shared(phi, q, c)[0] if kernel == "shared" else sum(ref_trak_per_group_terms(phi, q, c)[0])
        assert np.isfinite(s).all()
        assert rel_err(s, expected) < 1e-4


def test_rank_deficient_unregularised_uses_pseudo_inverse():
    rng = np.random.default_rng(5)
    phi = rng.standard_normal((12, K)).astype(np.float32)  # N < k: ΦᵀΦ is singular
    q = rng.standard_normal((3, K)).astype(np.float32)
    fitted = TRAK(c=0.0).fit(phi, SLICES)
    assert fitted.info["solver"] == "eigh" and "dual_blocks" not in fitted.info  # narrow blocks stay primal
    p = phi.astype(np.float64)
    expected = q.astype(np.float64) @ np.linalg.pinv(p.T @ p, rcond=1e-10) @ p.T
    assert np.isfinite(fitted.scores(q)).all() and rel_err(fitted.scores(q), expected) < 1e-4


def test_all_zero_group_gives_zero_contribution(data):
    phi, q = data
    phi = phi.copy()
    phi[:, 0:5] = 0.0
    fitted = TRAK(kernel="per-group").fit(phi, SLICES)
    contrib = fitted.contributions(q)
    assert np.isfinite(contrib).all() and np.all(contrib[:, :, 0] == 0)
    p, qq = phi.astype(np.float64), q.astype(np.float64)
    for j, (s, e) in list(enumerate(BLOCKS))[1:]:
        kinv, _ = inv_reg(p[:, s:e], 0.01)
        assert rel_err(contrib[:, :, j], qq[:, s:e] @ kinv @ p[:, s:e].T) < 1e-5


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [TracIn(), TRAK(), TRAK(kernel="per-group")])
def test_nan_or_inf_training_features_name_the_rows(data, method):
    phi, _ = data
    bad = phi.copy()
    bad[42, 3] = np.nan
    bad[150, 0] = np.inf
    with pytest.raises(UserError, match=r"NaN/Inf in rows 42.*re-featurize"):
        method.fit(bad, SLICES, chunk_rows=500)
    with pytest.raises(UserError, match=r"rows 150"):
        method.fit(np.concatenate([phi[:100], bad[100:]]), SLICES, chunk_rows=30)


def test_bad_queries_layouts_and_options_raise_user_error(data):
    phi, q = data
    fitted = TracIn().fit(phi, SLICES)
    bad_q = q.copy()
    bad_q[2, 1] = np.nan
    cases = [
        lambda: fitted.scores(q[:, :20]),                                   # query width != train width
        lambda: fitted.scores(q[0]),                                        # 1-D query
        lambda: fitted.scores(bad_q),                                       # NaN query
        lambda: fitted.scores(q, group_slices=[("down", 0, 5), ("mid", 5, 20), ("up", 20, 30)]),
        lambda: fitted.scores(q, weights=[1.0, 1.0]),                       # wrong number of weights
        lambda: fitted.scores(q, weights=[1.0, -0.1, 1.0]),                 # negative weight
        lambda: fitted.topk(q, N + 1),
        lambda: fitted.topk(q, 0),
        lambda: fitted.contributions(q, rows=[0, N]),
        lambda: TracIn().fit(phi, [("a", 0, 5), ("b", 6, 30)]),            # gap
        lambda: TracIn().fit(phi, [("a", 0, 5), ("b", 5, 29)]),            # does not cover k
        lambda: TracIn().fit(phi, [("a", 0, 5), ("a", 5, 30)]),            # duplicate names
        lambda: TracIn().fit(phi[None], SLICES),                            # 3-D features
        lambda: TracIn().fit(phi, SLICES, chunk_rows=0),
        lambda: get_method("influence"),
        lambda: get_method("trak", kernel="diagonal"),
        lambda: get_method("trak", c=-1.0),
        lambda: get_method("trak", lam=0.1),
        lambda: get_method("tracin", c=0.1),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(UserError) as info:
            case()
        assert "\n" not in str(info.value), i
    with pytest.raises(UserError, match="tracin, trak, dtrak"):
        get_method("influence")


@pytest.mark.parametrize("kernel", ["shared", "per-group"])
def test_query_side_fit_equals_psi_fit(data, kernel, tmp_path):
    """K on the queries (psi = Φ) gives the scores, top-k, contributions and saved Ψ of the Ψ = Φ K fit."""
    from gradtrace.weights import learn_weights

    phi, q = data
    method = get_method("trak", c=0.03, kernel=kernel)
    ref, qs = method.fit(phi, SLICES), method.fit(phi, SLICES, query_side=True)
    assert qs.query_side and not ref.query_side and qs.psi is phi  # no copy of Φ, no Ψ
    w = np.array([0.2, 1.0, 3.0])
    scale = max(np.abs(ref.scores(q, w)).max(), 1e-12)
    for weights in (None, w):
        np.testing.assert_allclose(qs.scores(q, weights), ref.scores(q, weights), rtol=0, atol=1e-5 * scale)
        i_ref, t_ref = ref.topk(q, 7, weights, chunk_rows=33)
        i_qs, t_qs = qs.topk(q, 7, weights, chunk_rows=33)
        np.testing.assert_array_equal(i_qs, i_ref)
        np.testing.assert_allclose(t_qs, t_ref, rtol=0, atol=1e-5 * scale)
    rows = [3, 150, 7]
    np.testing.assert_allclose(qs.contributions(q, rows=rows), ref.contributions(q, rows=rows), rtol=0,
                               atol=1e-5 * scale)
    np.testing.assert_allclose(qs.psi_rows(10, 20), ref.psi[10:20], rtol=0, atol=1e-6 * np.abs(ref.psi).max())
    loaded = FittedMethod.load(qs.save(tmp_path / "fit"))  # saved as an ordinary Ψ
    assert not loaded.query_side
    np.testing.assert_allclose(np.asarray(loaded.psi), ref.psi, rtol=0, atol=1e-6 * np.abs(ref.psi).max())
    with pytest.raises(UserError, match="needs Ψ"):
        learn_weights(qs, q, progress=False)
    with pytest.raises(UserError, match="psi_path"):
        method.fit(phi, SLICES, query_side=True, psi_path=tmp_path / "psi.npy")


# ---- blocks wider than the training set: the dual form ------------------------------------------
@pytest.mark.parametrize("kernel", ["shared", "per-group"])
@pytest.mark.parametrize("c", [0.0, 0.003, 0.5])
def test_blocks_wider_than_n_use_the_dual_form_and_equal_the_closed_form(data, kernel, c, monkeypatch):
    """12 rows: the 15-column group (and the 30-column shared block) are wider than N and, with the width
    threshold lowered, solved as (Φ_jΦ_jᵀ + λ_j I)⁻¹Φ_j; scores equal the primal closed form (pinv at c = 0)."""
    monkeypatch.setattr(trak_module, "DUAL_MIN_WIDTH", 12)
    phi, q = data[0][:12], data[1]
    fitted = get_method("trak", c=c, kernel=kernel).fit(phi, SLICES, chunk_rows=5)
    p, qq = phi.astype(np.float64), q.astype(np.float64)
    spans = [(0, K)] if kernel == "shared" else BLOCKS
    expected = np.zeros((len(q), 12))
    for s, e in spans:
        g = p[:, s:e].T @ p[:, s:e]
        lam = c * np.trace(g) / g.shape[0]
        inv = np.linalg.pinv(g) if c == 0 else np.linalg.inv(g + lam * np.eye(e - s))
        expected += qq[:, s:e] @ inv @ p[:, s:e].T
    assert rel_err(fitted.scores(q), expected) < 1e-4
    assert fitted.info["dual_blocks"] == (["all"] if kernel == "shared" else ["up"])
    if kernel == "per-group":
        lam_up = c * np.trace(p[:, 15:].T @ p[:, 15:]) / 15
        assert fitted.info["lambda_per_group"]["up"] == pytest.approx(lam_up, rel=1e-9)


def test_dual_blocks_refuse_the_query_side_mode_and_attribute_does_not_ask_for_it(data, monkeypatch):
    from gradtrace.methods.trak import has_dual_blocks

    monkeypatch.setattr(trak_module, "DUAL_MIN_WIDTH", 12)
    with pytest.raises(UserError, match="dual form"):
        get_method("trak", c=0.01, kernel="per-group").fit(data[0][:12], SLICES, query_side=True)
    assert has_dual_blocks("per-group", SLICES, 12) and has_dual_blocks("shared", SLICES, 29)
    assert not has_dual_blocks("per-group", SLICES, 15) and not has_dual_blocks("shared", SLICES, 30)
    monkeypatch.setattr(trak_module, "DUAL_MIN_WIDTH", 4096)
    assert has_dual_blocks("shared", [("all", 0, 5000)], 100)  # wider than N and than the threshold
    assert not has_dual_blocks("shared", [("all", 0, 3000)], 100)  # its 3000² inverse is cheap: primal


def test_per_group_damping_uses_each_groups_own_c(data):
    phi, q = data
    group_c = {"down": 0.3, "up": 0.001}  # "mid" keeps c
    fitted = TRAK(c=0.05, kernel="per-group", group_c=group_c).fit(phi, SLICES)
    p, qq = phi.astype(np.float64), q.astype(np.float64)
    expected = 0
    for (name, s, e) in SLICES:
        kinv, _ = inv_reg(p[:, s:e], group_c.get(name, 0.05))
        expected = expected + qq[:, s:e] @ kinv @ p[:, s:e].T
    assert rel_err(fitted.scores(q), expected) < 1e-5
    assert fitted.info["c_per_group"] == {"down": 0.3, "mid": 0.05, "up": 0.001}
    with pytest.raises(UserError, match="kernel='per-group'"):
        TRAK(c=0.05, kernel="shared", group_c=group_c)
    with pytest.raises(UserError, match="do not have: side"):
        TRAK(c=0.05, kernel="per-group", group_c={"side": 0.1}).fit(phi, SLICES)
