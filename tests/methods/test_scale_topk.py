"""Streaming top-k through feature stores of every storage dtype equals a dense top-k; dtype encodings."""
import numpy as np
import pytest
import torch

from gradtrace.errors import UserError
from gradtrace.features.row_encoding import decode_bfloat16, encode_rows
from gradtrace.features.store import FeatureStore
from gradtrace.methods import FittedMethod, get_method

SLICES = [("a", 0, 8), ("b", 8, 20), ("c", 20, 24)]


def _settings(dtype, chunk=700):
    return {"model_fingerprint": "x", "groups": [{"name": n, "start": s, "stop": e} for n, s, e in SLICES],
            "projection": {"kind": "test"}, "measurement": {"name": "loss"}, "dtype": dtype, "dim": 24,
            "chunk_rows": chunk}


def _store(tmp_path, dtype, phi, chunk=700):
    store = FeatureStore.create(tmp_path / dtype, _settings(dtype, chunk), np.arange(len(phi)) + 10)
    for s in range(0, len(phi), chunk):
        store.write(s, phi[s:s + chunk])
    store.finish()
    return FeatureStore.open(tmp_path / dtype)


def _dense_topk(scores, k):
    """Descending score, ties to the lower index: an independent (lexsort over the full matrix) reference."""
    idx = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])
    return idx, np.take_along_axis(scores, idx, 1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_streaming_topk_through_store_equals_dense_topk(tmp_path, dtype, method):
    rng = np.random.default_rng(0)
    phi = (rng.standard_normal((3000, 24)) * rng.lognormal(0, 0.5, (3000, 1))).astype(np.float32)
    phi[17] *= 10.0 / np.abs(phi[17]).mean()
    phi[1500] = phi[17]  # an exact tie (and the top for query 3): the lower index must come first
    q = rng.standard_normal((7, 24)).astype(np.float32)
    q[3] = phi[17]
    store = _store(tmp_path, dtype, phi)
    assert store.settings["dtype"] == dtype and store.features.shape == (3000, 24)
    stored = np.asarray(store.features, dtype=np.float64)  # the values the store holds, decoded
    tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    assert np.abs(stored - phi).max() <= tol * np.abs(phi).max()
    if method == "tracin":
        fitted = get_method("tracin").fit(store.features, store.group_slices)
        streamed = FittedMethod(psi=store.features, group_slices=store.group_slices)  # Ψ = the stored array
        dense = q.astype(np.float64) @ stored.T
    else:
        fitted = get_method("trak", c=0.05).fit(store.features, store.group_slices, chunk_rows=500)
        # K on the queries, scored against the store's own array (what `attribute` does for large stores)
        streamed = get_method("trak", c=0.05).fit(store.features, store.group_slices, chunk_rows=500,
                                                  query_side=True)
        assert streamed.psi is store.features  # read in row chunks: never decoded or copied whole
        gram = stored.T @ stored
        kernel = np.linalg.inv(gram + 0.05 * np.mean(np.diag(gram)) * np.eye(24))
        dense = q.astype(np.float64) @ kernel @ stored.T
    weights = np.array([1.0, 0.5, 2.0])
    for w in (None, weights):
        ref = dense if w is None else (q.astype(np.float64) * np.repeat(w, [8, 12, 4])) @ (
            stored.T if method == "tracin" else kernel @ stored.T)
        ref_idx, ref_top = _dense_topk(ref, 25)
        for f in (fitted, streamed):
            idx, top = f.topk(q, 25, w, chunk_rows=257)  # many chunks
            where = list(idx[3])
            assert 17 in where and 1500 in where and where.index(17) + 1 == where.index(1500)
            np.testing.assert_allclose(top, ref_top, rtol=1e-4, atol=1e-4 * np.abs(ref_top).max())
            # Rankings agree except where two scores are within float32 rounding of each other.
            gaps = np.abs(ref[np.arange(len(q))[:, None], idx] - ref_top)
            assert np.all((idx == ref_idx) | (gaps <= 1e-5 * np.abs(ref_top).max()))


def test_bfloat16_encoding_matches_torch_and_float16_refuses_overflow(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, 24)) * 10.0 ** rng.integers(-6, 6, (50, 24))).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1.0, -3.0]
    ours = decode_bfloat16(encode_rows(x, "bfloat16"))
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()  # round to nearest even
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    with pytest.raises(UserError, match="exceeds the float16 range"):
        encode_rows(np.full((1, 24), 7e4, np.float32), "float16")
    with pytest.raises(UserError, match="unknown feature storage dtype"):
        FeatureStore.create(tmp_path / "s", _settings("int8"), np.arange(3))
    store = _store(tmp_path, "bfloat16", x, chunk=20)
    raw = np.load(tmp_path / "bfloat16" / "features.npy")
    assert raw.dtype == np.uint16 and raw.nbytes == x.size * 2  # half the bytes of float32
    np.testing.assert_array_equal(store.features[5:9], theirs[5:9])  # row reads decode only those rows
    f16 = _store(tmp_path, "float16", x[np.abs(x).max(1) < 6e4], chunk=20)
    assert f16.features.dtype == np.float16
