"""The Gram blocks kept beside a training store (`gradtrace.attribution.gram_cache`): the blocks equal Φ_jᵀΦ_j of
numpy in float64, a later fit that reads them scores bit-identically to a fit without any cache, and a store that
changed (features rewritten, rows added, a damaged cache) or cannot be written is scored from a fresh Gram pass."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gradtrace.attribution import fit_method, gram_cache as cache_module
from gradtrace.attribution.gram_cache import MIN_BYTES_ENV, load_gram, store_fingerprint
from gradtrace.features.store import FeatureStore
from gradtrace.methods.trak import TRAK, accumulate_gram

K, GROUPS, CHUNK = 48, 3, 64
W = np.array([0.3, 1.0, 2.0])


def _settings(dtype: str) -> dict:
    w = K // GROUPS
    return {"model_fingerprint": "synthetic", "groups_spec": "synthetic",
            "groups": [{"name": f"g{j}", "start": j * w, "stop": (j + 1) * w, "size": w, "exact": True,
                        "params": []} for j in range(GROUPS)],
            "projection": {"kind": "synthetic"}, "measurement": {"name": "loss"}, "dtype": dtype,
            "dim": K, "chunk_rows": CHUNK, "source": {"synthetic": 1}}


def _features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, K))
    scale = np.exp(0.5 * rng.standard_normal((n, 1)))
    return (scale * (centres[np.arange(n) % 12] + 1.5 * rng.standard_normal((n, K)))).astype(np.float32)


def _store(path, feats, dtype="float32", first_id=0):
    store = FeatureStore.create(path, _settings(dtype), np.arange(len(feats)) + first_id)
    for start in range(0, len(feats), CHUNK):
        store.write(start, feats[start:start + CHUNK])
    store.finish()
    store.release()
    return FeatureStore.open(path)


@pytest.fixture
def cached(monkeypatch):
    monkeypatch.setenv(MIN_BYTES_ENV, "0")  # the test stores are small: keep their blocks too


def _reference_blocks(store) -> list[np.ndarray]:
    x = np.asarray(store.features, dtype=np.float64)
    return [x[:, s:e].T @ x[:, s:e] for _, s, e in store.group_slices]


def _scores(train, queries, c=0.01, kernel="per-group"):
    fitted = fit_method(train, "trak", kernel=kernel, c=c, progress=False, query_side=True)
    qf = np.asarray(queries.features)
    return fitted, fitted.scores(qf, W), fitted.topk(qf, 7, W)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_first_fit_keeps_the_blocks_and_later_fits_read_them_bit_identically(tmp_path, monkeypatch, dtype):
    train, queries = _store(tmp_path / "train", _features(400, 0), dtype), _store(tmp_path / "q", _features(9, 1),
                                                                                   dtype, 10_000)
    _, plain, plain_top = _scores(train, queries)  # no cache at this size without the override
    assert not (train.path / "gram").exists()
    monkeypatch.setenv(MIN_BYTES_ENV, "0")
    first, scores, top = _scores(train, queries)
    assert first.info["gram_cache"] == "written"
    doc = json.loads((train.path / "gram" / "per-group.json").read_text())
    assert doc["rows"] == 400 and doc["ranks"] == 1 and doc["store_fingerprint"] == store_fingerprint(train)
    gram, state = load_gram(train, "per-group")
    assert state == "hit"
    for block, want in zip(gram.blocks, _reference_blocks(train)):
        np.testing.assert_allclose(block, want, rtol=1e-13, atol=1e-10)
    again, scores2, top2 = _scores(train, queries)
    assert again.info["gram_cache"] == "hit"
    for a in (scores, scores2):
        np.testing.assert_array_equal(a, plain)
    for got in (top, top2):
        np.testing.assert_array_equal(got[0], plain_top[0])
        np.testing.assert_array_equal(got[1], plain_top[1])
    # the blocks do not depend on c: another c reads them and equals its own uncached fit
    other, at_c, _ = _scores(train, queries, c=0.2)
    assert other.info["gram_cache"] == "hit"
    monkeypatch.setenv(MIN_BYTES_ENV, str(10**12))
    np.testing.assert_array_equal(at_c, _scores(train, queries, c=0.2)[1])


def test_the_shared_kernel_keeps_its_own_block(tmp_path, cached):
    train, queries = _store(tmp_path / "train", _features(300, 2)), _store(tmp_path / "q", _features(5, 3),
                                                                            first_id=10_000)
    fitted, _, _ = _scores(train, queries, kernel="shared")
    assert fitted.info["gram_cache"] == "written" and (train.path / "gram" / "shared.npy").exists()
    x = np.asarray(train.features, dtype=np.float64)
    np.testing.assert_allclose(load_gram(train, "shared")[0].blocks[0], x.T @ x, rtol=1e-13, atol=1e-10)
    assert load_gram(train, "per-group") == (None, "absent")


def test_a_changed_store_or_a_damaged_cache_is_computed_again(tmp_path, cached):
    feats = _features(320, 4)
    train, queries = _store(tmp_path / "train", feats), _store(tmp_path / "q", _features(6, 5), first_id=10_000)
    _, want, _ = _scores(train, queries)
    # features.npy rewritten (its modification time moves): the fingerprint no longer matches
    st = os.stat(train.path / "features.npy")
    os.utime(train.path / "features.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_gram(FeatureStore.open(train.path), "per-group") == (None, "stale")
    fitted, got, _ = _scores(FeatureStore.open(train.path), queries)
    assert fitted.info["gram_cache"] == "recomputed"
    np.testing.assert_array_equal(got, want)
    # damaged bytes under an intact manifest: their digest does not match
    blocks = np.load(train.path / "gram" / "per-group.npy")
    np.save(train.path / "gram" / "per-group.npy", blocks * 2)
    fitted, got, _ = _scores(FeatureStore.open(train.path), queries)
    assert fitted.info["gram_cache"] == "recomputed"
    np.testing.assert_array_equal(got, want)
    # rows added (a new store with the old store's cache copied in): recomputed on the new rows
    more = _store(tmp_path / "more", np.concatenate([feats, _features(64, 6)]))
    (more.path / "gram").mkdir()
    for name in ("per-group.npy", "per-group.json"):
        (more.path / "gram" / name).write_bytes((train.path / "gram" / name).read_bytes())
    fitted, _, _ = _scores(more, queries)
    assert fitted.info["gram_cache"] == "recomputed"
    for block, ref in zip(load_gram(more, "per-group")[0].blocks, _reference_blocks(more)):
        np.testing.assert_allclose(block, ref, rtol=1e-13, atol=1e-10)


def test_a_store_that_cannot_be_written_is_scored_without_a_cache(tmp_path, cached, monkeypatch):
    train, queries = _store(tmp_path / "train", _features(200, 7)), _store(tmp_path / "q", _features(4, 8),
                                                                            first_id=10_000)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(train.path / "gram"))

    monkeypatch.setattr(cache_module, "atomic_write", read_only)
    fitted, got, _ = _scores(train, queries)
    assert fitted.info["gram_cache"] == "not writable" and not (train.path / "gram" / "per-group.json").exists()
    phi = np.asarray(train.features)
    want = fit_method(train, "trak", c=0.01, progress=False).scores(np.asarray(queries.features), W)  # Ψ path
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert accumulate_gram(phi, train.group_slices, "per-group").n == 200


def test_the_label_free_lambda_search_reads_the_kept_blocks(tmp_path, monkeypatch):
    from gradtrace.attribution.lambda_rule import choose_c

    train, learning = _store(tmp_path / "train", _features(256, 9)), _store(tmp_path / "q", _features(8, 10),
                                                                             first_id=10_000)
    plain = choose_c(train, learning, "trak", "per-group", 5)
    monkeypatch.setenv(MIN_BYTES_ENV, "0")
    assert choose_c(train, learning, "trak", "per-group", 5) == plain  # computes and keeps the blocks
    assert load_gram(train, "per-group")[1] == "hit"
    calls = []
    monkeypatch.setattr(TRAK, "gram", lambda *a, **k: calls.append(1))
    assert choose_c(train, learning, "trak", "per-group", 5) == plain and not calls  # read, not computed
