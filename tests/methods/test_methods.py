"""gradtrace.methods against closed forms computed here with plain numpy (float64, np.linalg.inv)."""
from __future__ import annotations

import numpy as np
import pytest

import gradtrace.methods.trak as trak_module
from gradtrace.errors import UserError
from gradtrace.methods import TRAK, FittedMethod, TracIn, get_method, lambda_grid

N, K = 200, 30
SLICES = [("down", 0, 5), ("mid", 5, 15), ("up", 15, 30)]
BLOCKS = [(0, 5), (5, 15), (15, 30)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    # Groups with different scales, so per-group λ_j differ and group weights matter.
    scale = np.concatenate([np.full(5, 3.0), np.full(10, 1.0), np.full(15, 0.2)])
    phi = (rng.standard_normal((N, K)) * scale).astype(np.float32)
    queries = (rng.standard_normal((6, K)) * scale).astype(np.float32)
    return phi, queries


def _inv_reg(a: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    g = a.T @ a
    lam = c * np.trace(g) / g.shape[0]
    return np.linalg.inv(g + lam * np.eye(g.shape[0])), lam


def ref_trak_shared(phi, q, c):
    p, q = phi.astype(np.float64), q.astype(np.float64)
    kinv, lam = _inv_reg(p, c)
    return q @ kinv @ p.T, lam


def ref_trak_per_group_terms(phi, q, c):
    """(list of per-group score matrices Q_j K_j Φ_jᵀ, list of λ_j)."""
    p, q = phi.astype(np.float64), q.astype(np.float64)
    terms, lams = [], []
    for s, e in BLOCKS:
        kinv, lam = _inv_reg(p[:, s:e], c)
        terms.append(q[:, s:e] @ kinv @ p[:, s:e].T)
        lams.append(lam)
    return terms, lams


def dense_topk(scores: np.ndarray, k: int):
    """Reference top-k: descending score, ties to the lower index."""
    idx = np.arange(scores.shape[1])
    order = np.array([np.lexsort((idx, -row))[:k] for row in scores])
    return order, np.take_along_axis(scores, order, axis=1)


def rel_err(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


# ---- closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 7, 200, 65536])
def test_tracin_scores_are_dot_products(data, chunk_rows):
    phi, q = data
    fitted = TracIn().fit(phi, SLICES, chunk_rows=chunk_rows)
    assert np.shares_memory(fitted.psi, phi)  # Ψ = Φ is referenced, not copied
    s = fitted.scores(q, chunk_rows=chunk_rows)
    assert s.dtype == np.float32 and s.shape == (6, N)
    assert rel_err(s, q.astype(np.float64) @ phi.astype(np.float64).T) < 1e-6
    assert fitted.info["method"] == "tracin" and fitted.info["kernel"] == "identity"


@pytest.mark.parametrize("c", [0.01, 0.3])
def test_trak_shared_matches_closed_form(data, c):
    phi, q = data
    fitted = TRAK(c=c).fit(phi, SLICES)
    expected, lam = ref_trak_shared(phi, q, c)
    assert rel_err(fitted.scores(q), expected) < 1e-5
    assert fitted.info["lambda"] == pytest.approx(lam, rel=1e-12)
    assert fitted.info["c"] == c and fitted.info["kernel"] == "shared" and fitted.info["N"] == N


def test_trak_default_c_is_one_percent_of_mean_gram_diagonal(data):
    phi, _ = data
    fitted = get_method("trak").fit(phi, SLICES)
    p = phi.astype(np.float64)
    assert fitted.info["c"] == 0.01
    assert fitted.info["lambda"] == pytest.approx(0.01 * np.mean(np.sum(p * p, axis=0)), rel=1e-12)


def test_trak_per_group_matches_blockwise_closed_form(data):
    phi, q = data
    fitted = TRAK(c=0.05, kernel="per-group").fit(phi, SLICES, chunk_rows=33)
    terms, lams = ref_trak_per_group_terms(phi, q, 0.05)
    assert rel_err(fitted.scores(q), sum(terms)) < 1e-5
    got = fitted.info["lambda_per_group"]
    assert [got[name] for name, _, _ in SLICES] == pytest.approx(lams, rel=1e-12)
    assert len(set(np.round(lams, 6))) == 3  # scales differ, so the λ_j do
    # and it really differs from the shared kernel on this data
    assert rel_err(sum(terms), ref_trak_shared(phi, q, 0.05)[0]) > 1e-2


def test_single_group_per_group_equals_shared(data):
    phi, q = data
    one = [("all", 0, K)]
    shared = TRAK(kernel="shared").fit(phi, one).scores(q)
    per_group = TRAK(kernel="per-group").fit(phi, one).scores(q)
    np.testing.assert_allclose(per_group, shared, rtol=1e-6, atol=1e-7 * np.abs(shared).max())


def test_dtrak_is_trak_kernel_under_its_own_name(data):
    phi, q = data
    d = get_method("dtrak", c=0.02, kernel="per_group").fit(phi, SLICES)
    t = get_method("trak", c=0.02, kernel="per-group").fit(phi, SLICES)
    np.testing.assert_array_equal(d.scores(q), t.scores(q))
    assert d.info["method"] == "dtrak" and t.info["method"] == "trak"


# ---- contributions and weights -----------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["shared", "per-group"])
def test_contributions_sum_to_scores_and_weights_scale_them(data, kernel):
    phi, q = data
    fitted = TRAK(kernel=kernel).fit(phi, SLICES)
    contrib = fitted.contributions(q)
    assert contrib.shape == (6, N, 3) and contrib.dtype == np.float32
    scores = fitted.scores(q)
    np.testing.assert_allclose(contrib.sum(axis=2), scores, rtol=1e-5, atol=1e-5 * np.abs(scores).max())
    w = np.array([0.7, 0.0, 2.5])
    weighted = fitted.scores(q, weights=w)
    expected = contrib.astype(np.float64) @ w
    np.testing.assert_allclose(weighted, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    rows = np.array([199, 0, 57, 57])
    np.testing.assert_allclose(fitted.contributions(q, rows=rows), contrib[:, rows], rtol=1e-6, atol=1e-7)


def test_per_group_contributions_match_closed_form_terms(data):
    phi, q = data
    fitted = TRAK(c=0.05, kernel="per-group").fit(phi, SLICES)
    terms, _ = ref_trak_per_group_terms(phi, q, 0.05)
    contrib = fitted.contributions(q)
    for j, term in enumerate(terms):
        assert rel_err(contrib[:, :, j], term) < 1e-5
    tracin = TracIn().fit(phi, SLICES).contributions(q)
    for j, (s, e) in enumerate(BLOCKS):
        assert rel_err(tracin[:, :, j], q[:, s:e].astype(np.float64) @ phi[:, s:e].astype(np.float64).T) < 1e-6


# ---- top-k -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 7, 10, 64, 199, 200, 5000])
@pytest.mark.parametrize("k", [1, 10, 200])
def test_topk_streaming_equals_dense_argsort(data, chunk_rows, k):
    phi, q = data
    fitted = TRAK(kernel="per-group").fit(phi, SLICES)
    for w in (None, np.array([0.1, 3.0, 0.5])):
        dense = fitted.scores(q, weights=w)
        idx, vals = fitted.topk(q, k, weights=w, chunk_rows=chunk_rows)
        ref_idx, ref_vals = dense_topk(dense, k)
        assert idx.dtype == np.int64 and vals.dtype == np.float32 and idx.shape == (6, k)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(vals, ref_vals, rtol=1e-6, atol=1e-6 * np.abs(dense).max())


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 5, 16, 100])
def test_topk_ties_go_to_lower_index_across_chunk_boundaries(chunk_rows):
    rng = np.random.default_rng(7)
    # Small integers: every score is exact in float32, so ties are exact; duplicate rows make many.
    base = rng.integers(-2, 3, size=(6, 4)).astype(np.float32)
    phi = base[rng.integers(0, 6, size=40)]
    q = rng.integers(-2, 3, size=(5, 4)).astype(np.float32)
    slices = [("a", 0, 1), ("b", 1, 4)]
    fitted = TracIn().fit(phi, slices)
    exact = q.astype(np.int64) @ phi.astype(np.int64).T
    for k in (1, 3, 7, 40):
        idx, vals = fitted.topk(q, k, chunk_rows=chunk_rows)
        ref_idx, ref_vals = dense_topk(exact, k)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(vals, ref_vals.astype(np.float32))


# ---- chunking, memmaps, persistence ------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["shared", "per-group"])
def test_chunked_fit_equals_unchunked(data, kernel):
    phi, q = data
    method = TRAK(kernel=kernel)
    whole = method.fit(phi, SLICES, chunk_rows=10**6)
    chunked = method.fit(phi, SLICES, chunk_rows=13)
    np.testing.assert_allclose(chunked.psi, whole.psi, rtol=1e-5, atol=1e-6 * np.abs(whole.psi).max())
    key = "lambda" if kernel == "shared" else "lambda_per_group"
    assert chunked.info[key] == pytest.approx(whole.info[key], rel=1e-12)
    g13 = method.gram(phi, SLICES, chunk_rows=13)
    p = phi.astype(np.float64)
    spans = [(0, K)] if kernel == "shared" else BLOCKS
    for block, (s, e) in zip(g13.blocks, spans):
        np.testing.assert_allclose(block, p[:, s:e].T @ p[:, s:e], rtol=1e-12, atol=1e-9)


def test_memmap_features_and_psi_path_and_save_load(data, tmp_path):
    phi, q = data
    path = tmp_path / "phi.npy"
    np.save(path, phi)
    mm = np.load(path, mmap_mode="r")  # read-only memmap
    expected = TRAK(kernel="per-group").fit(phi, SLICES).scores(q)
    on_disk = TRAK(kernel="per-group").fit(mm, SLICES, chunk_rows=17, psi_path=tmp_path / "out" / "psi.npy")
    assert isinstance(on_disk.psi, np.memmap) and not on_disk.psi.flags.writeable
    # float32 BLAS may round differently with block size, hence allclose rather than equality
    np.testing.assert_allclose(on_disk.scores(q, chunk_rows=9), expected, rtol=1e-5, atol=1e-6)
    on_disk.save(tmp_path / "out")  # Ψ already lives there: manifest only
    loaded = FittedMethod.load(tmp_path / "out")
    assert loaded.info == on_disk.info and loaded.group_slices == SLICES
    np.testing.assert_allclose(loaded.scores(q), expected, rtol=1e-5, atol=1e-6)
    # TracIn on a memmap references it; save copies it.
    tracin = TracIn().fit(mm, SLICES, chunk_rows=50)
    tracin.save(tmp_path / "tracin")
    np.testing.assert_array_equal(np.load(tmp_path / "tracin" / "psi.npy"), phi)
    np.testing.assert_array_equal(FittedMethod.load(tmp_path / "tracin").topk(q, 5)[0],
                                  dense_topk(q.astype(np.float64) @ phi.astype(np.float64).T, 5)[0])


@pytest.mark.parametrize("method,query_side", [(TracIn(), False), (TRAK(c=0.03, kernel="per-group"), False),
                                               (TRAK(c=0.03, kernel="per-group"), True),
                                               (TRAK(c=0.03, kernel="shared"), True)])
def test_topk_contributions_equal_each_querys_dense_contributions(data, method, query_side):
    """Each query's own rows (the top-k), all queries at once: the dense breakdown φ_j(q) · ψ_j(x_n) of Ψ = Φ K
    (the Ψ fit, float64 products) at those rows; in query-side mode too, where a shared K spans the groups."""
    phi, q = data
    fitted = method.fit(phi, SLICES, query_side=True) if query_side else method.fit(phi, SLICES)
    psi = np.asarray(method.fit(phi, SLICES).psi, dtype=np.float64)
    idx, top = fitted.topk(q, 6)
    got = fitted.topk_contributions(q, idx)
    want = np.stack([np.stack([q[i, s:e].astype(np.float64) @ psi[idx[i], s:e].T for _, s, e in SLICES], axis=1)
                     for i in range(len(q))])
    np.testing.assert_allclose(np.stack([fitted.contributions(q[i:i + 1], rows=idx[i])[0] for i in range(len(q))]),
                               want, rtol=0, atol=1e-5 * np.abs(want).max())
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got.sum(axis=2), top, rtol=0, atol=1e-5 * np.abs(top).max())
    with pytest.raises(UserError, match="idx must be"):
        fitted.topk_contributions(q, idx[:2])


def test_tracin_references_a_float16_store_and_scores_its_exact_upcast(data, tmp_path):
    """No N-sized copy of a reduced-precision Φ: chunks are upcast as they are scored (float16 -> float32 is exact,
    so the results are those of the float32 upcast, bit for bit)."""
    phi, q = data
    np.save(tmp_path / "phi16.npy", phi.astype(np.float16))
    mm = np.load(tmp_path / "phi16.npy", mmap_mode="r")
    up = np.asarray(mm, dtype=np.float32)
    fitted, ref = TracIn().fit(mm, SLICES, chunk_rows=40), TracIn().fit(up, SLICES)
    assert fitted.psi is mm
    for a, b in zip(fitted.topk(q, 6, chunk_rows=40), ref.topk(q, 6, chunk_rows=40)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fitted.contributions(q, rows=[4, 0, 9]), ref.contributions(q, rows=[4, 0, 9]))
    fitted.save(tmp_path / "t16")
    np.testing.assert_array_equal(np.load(tmp_path / "t16" / "psi.npy"), up)


def test_gram_reuse_across_c_equals_direct_fit(data):
    phi, q = data
    gram = TRAK(kernel="per-group").gram(phi, SLICES)
    for c in lambda_grid(3):
        direct = TRAK(c=c, kernel="per-group").fit(phi, SLICES).scores(q)
        reused = TRAK(c=c, kernel="per-group").fit(phi, SLICES, gram=gram).scores(q)
        np.testing.assert_array_equal(reused, direct)
    with pytest.raises(UserError, match="kernel"):
        TRAK(kernel="shared").fit(phi, SLICES, gram=gram)
    with pytest.raises(UserError, match="rows"):
        TRAK(kernel="per-group").fit(phi[:50], SLICES, gram=gram)


def test_lambda_grid_is_log_grid():
    np.testing.assert_allclose(lambda_grid(), 10.0 ** np.arange(-4, 0.5, 0.5), rtol=1e-12)
    np.testing.assert_allclose(lambda_grid(5), [1e-4, 1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)


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
        kinv, _ = _inv_reg(p[:, s:e], 0.01)
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
        kinv, _ = _inv_reg(p[:, s:e], group_c.get(name, 0.05))
        expected = expected + qq[:, s:e] @ kinv @ p[:, s:e].T
    assert rel_err(fitted.scores(q), expected) < 1e-5
    assert fitted.info["c_per_group"] == {"down": 0.3, "mid": 0.05, "up": 0.001}
    with pytest.raises(UserError, match="kernel='per-group'"):
        TRAK(c=0.05, kernel="shared", group_c=group_c)
    with pytest.raises(UserError, match="do not have: side"):
        TRAK(c=0.05, kernel="per-group", group_c={"side": 0.1}).fit(phi, SLICES)
