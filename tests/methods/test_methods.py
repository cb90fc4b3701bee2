"""gradtrace.methods against closed forms computed here with plain numpy (float64, np.linalg.inv)."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures.method_refs import (
    BLOCKS,
    SLICES,
    K,
    N,
    dense_topk,
    ref_trak_per_group_terms,
    ref_trak_shared,
    rel_err,
)
from gradtrace.errors import UserError
from gradtrace.methods import TRAK, FittedMethod, TracIn, get_method, lambda_grid


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
