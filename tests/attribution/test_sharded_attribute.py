"""attribute under torchrun: each rank scores its rows (of the one store, or of its node's partial store), the Gram
shares are all-reduced over gloo, the last rank merges the partial top-k. Checked against one process's `attribute`
on the same stores: top-k ids exactly, scores / contributions / dense scores within float32 rounding (the Gram is
summed in another order: ranks' partial sums, then their sum, so K differs from one process's in the last bits of
float64 and not bitwise)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures.ranks import synthetic_settings, torchrun, write_store
from gradtrace.attribution.sharded import ShardRows, merge_partials, shard_ranges
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods.topk import RunningTopK

N, K, GROUPS, Q, CHUNK = 600, 48, 3, 7, 64  # 10 chunks, the last one short


def _features(n, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, K))
    scale = np.exp(0.5 * rng.standard_normal((n, 1)))
    return (scale * (centres[np.arange(n) % 20] + 1.5 * rng.standard_normal((n, K)))).astype(np.float32)


def _store(path, feats, ids, rank=0, world=1):
    return write_store(path, synthetic_settings(K, GROUPS, CHUNK), feats, ids, rank, world)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    train, queries = _features(N, 0), _features(Q, 1)
    ids = np.arange(N) * 3 + 5  # ids are not row numbers
    _store(root / "train", train, ids)
    _store(root / "queries", queries, np.arange(Q) + 10_000)
    for r in (0, 1):  # two machines without a shared filesystem: one partial store each, at the same path
        _store(root / f"node{r}" / "train", train, ids, rank=r, world=2)
        _store(root / f"node{r}" / "queries", queries, np.arange(Q) + 10_000)
    (root / "w.json").write_text(json.dumps({"weights": {"g0": 0.5, "g1": 1.5, "g2": 1.0}}))
    return root


def _torchrun(args, cwds, nproc=2, ok=True):
    """Run `gradtrace attribute ARGS` under torchrun (`fixtures.ranks.torchrun`)."""
    return torchrun(["-m", "gradtrace.cli", "--", "attribute", *args], cwds, nproc, ok)


def _read(out):
    doc = json.loads((out / "attributions.json").read_text())
    arrays = {name: np.load(out / name) for name in ("topk_ids.npy", "topk_scores.npy", "topk_contributions.npy",
                                                      "scores.npy")}
    return doc, arrays


def _assert_same(sharded, single):
    (doc_a, a), (doc_b, b) = _read(sharded), _read(single)
    np.testing.assert_array_equal(a["topk_ids.npy"], b["topk_ids.npy"])
    for name in ("topk_scores.npy", "topk_contributions.npy", "scores.npy"):
        scale = np.abs(b[name]).max()
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    assert [[t["train_id"] for t in q["top"]] for q in doc_a["queries"]] == \
        [[t["train_id"] for t in q["top"]] for q in doc_b["queries"]]
    assert doc_a["manifest"]["ranks"] == 2 and doc_a["manifest"]["method"]["N"] == N
    assert doc_a["manifest"]["weights"] == doc_b["manifest"]["weights"]
    lam_a, lam_b = doc_a["manifest"]["method"]["lambda_per_group"], doc_b["manifest"]["method"]["lambda_per_group"]
    assert lam_a is None and lam_b is None or all(np.isclose(lam_a[g], lam_b[g], rtol=1e-12) for g in lam_b)


@pytest.mark.parametrize("method", ["trak", "tracin"])
def test_two_ranks_on_one_store_give_the_top_k_of_one_process(stores, tmp_path, method):
    args = ["--train", str(stores / "train"), "--queries", str(stores / "queries"), "--method", method,
            "--weights", str(stores / "w.json"), "--top-k", "12", "--no-progress", "--no-report"]
    assert main(["attribute", *args, "--out", str(tmp_path / "one")]) == 0
    _torchrun(args + ["--out", str(tmp_path / "two")], [str(tmp_path)])
    _assert_same(tmp_path / "two", tmp_path / "one")


def test_two_machines_score_their_partial_stores_without_copying(stores, tmp_path):
    args = ["--train", "train", "--queries", "queries", "--lambda-c", "0.05", "--top-k", "9", "--no-progress",
            "--no-report"]
    assert main(["attribute", "--train", str(stores / "train"), "--queries", str(stores / "queries"), *args[4:],
                 "--out", str(tmp_path / "one")]) == 0
    _torchrun(args + ["--out", "out"], [str(stores / "node0"), str(stores / "node1")])
    _assert_same(stores / "node1" / "out", tmp_path / "one")  # the last rank (node 1) writes
    assert not (stores / "node0" / "out").exists()


def test_a_refusal_on_a_rank_stops_every_rank_with_its_one_line_message(stores, tmp_path):
    (code, err), = _torchrun(["--train", str(stores / "node0" / "train"), "--queries", str(stores / "queries"),
                              "--no-progress", "--out", str(tmp_path / "x")], [str(tmp_path)], ok=False)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("gradtrace attribute: error:")]
    # rank 1's chunks are not in node 0's partial store: rank 1 says so, rank 0 stops with the same reason (whichever
    # exits first, torchrun then ends the other, so one or both lines are printed), exit code 2 (a UserError)
    assert 1 <= len(lines) <= 2 and all("rank 1 of 2" in line for line in lines), err[-2000:]
    assert "exitcode  : 2" in err and "Traceback" not in err.split("torch/distributed/elastic")[0]
    assert not (tmp_path / "x").exists()


def test_a_partial_store_without_the_ranks_chunks_is_refused(stores):
    part = FeatureStore.open(stores / "node0" / "train", require_complete=False)
    assert shard_ranges(part, 0, 2) == [(c * CHUNK, min(N, (c + 1) * CHUNK)) for c in range(0, 10, 2)]
    with pytest.raises(UserError, match=r"rank 1 of 2 .* 5 of them are not in this partial store \(rows 64..127"):
        shard_ranges(part, 1, 2)
    whole = FeatureStore.open(stores / "train")
    assert shard_ranges(whole, 1, 3) == [(200, 400)]


def test_shard_rows_read_the_ranks_rows_and_the_merge_breaks_ties_like_one_process():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    view = ShardRows(x, [(2, 5), (9, 12), (15, 16)])
    assert view.shape == (7, 2)
    np.testing.assert_array_equal(view[1:6], x[[3, 4, 9, 10, 11]])
    np.testing.assert_array_equal(view[np.array([6, 0])], x[[15, 2]])
    np.testing.assert_array_equal(view.global_rows([0, 3, 6]), [2, 9, 15])
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(5, 30)).astype(np.float32)  # many ties at every cut
    whole = RunningTopK(5, 6)
    whole.update(scores, 0)
    parts = []
    for rows in ([(0, 7), (20, 30)], [(7, 20)]):
        cols = np.concatenate([np.arange(a, b) for a, b in rows])
        part = RunningTopK(5, 6)
        part.update(scores[:, cols], 0)
        idx, val = part.result()
        parts.append({"rows": cols[idx], "scores": val, "contrib": val[:, :, None], "dense": scores[:, cols],
                      "ranges": rows, "info": {"N": len(cols)}})
    idx, top, contrib, dense, info = merge_partials(parts, 6, 30, 5)
    np.testing.assert_array_equal(idx, whole.result()[0])
    np.testing.assert_array_equal(top, whole.result()[1])
    np.testing.assert_array_equal(contrib[:, :, 0], top)
    np.testing.assert_array_equal(dense, scores)
    assert info == {"N": 30}


@pytest.mark.parametrize("query_side", [True, False])
def test_shares_of_the_gram_and_partial_top_k_equal_one_fit_in_both_scoring_modes(stores, query_side):
    """The path of stores too large for Ψ in memory (K on the queries) as well as the small-store one, in process:
    each shard's Gram share summed, each shard scored, the partials merged."""
    from gradtrace.attribution import fit_method
    from gradtrace.attribution.sharded import gram_share, score_shard
    from gradtrace.methods import configure

    train, queries = FeatureStore.open(stores / "train"), FeatureStore.open(stores / "queries")
    base = configure("trak", kernel="per-group", c=0.02)
    views = [ShardRows(train.features, shard_ranges(train, r, 3)) for r in range(3)]
    shares = [gram_share(v, train.group_slices, base.kernel) for v in views]
    blocks = [sum(parts) for parts in zip(*shares)]
    w = np.array([0.2, 1.0, 3.0])
    parts = [score_shard(train, queries, base, v, blocks, w, 8, full=True, query_side=query_side, progress=False)
             for v in views]
    idx, top, contrib, dense, info = merge_partials(parts, 8, N, Q)
    one = fit_method(train, "trak", c=0.02, progress=False, query_side=query_side)
    qf = np.asarray(queries.features)
    want_idx, want_top = one.topk(qf, 8, w)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(top, want_top, rtol=1e-5)
    np.testing.assert_allclose(dense, one.scores(qf, w), rtol=1e-5, atol=1e-6 * np.abs(want_top).max())
    np.testing.assert_allclose(contrib.sum(axis=2), want_top, rtol=1e-4)
    assert info.get("query_side", False) is query_side


def test_ranks_keep_the_gram_blocks_and_read_them_back_like_one_process(stores, tmp_path, monkeypatch):
    """Under torchrun the last rank keeps the all-reduced blocks beside the complete store (`"ranks": 2`); one
    process then reads them, and so does a second torchrun job: every run gives one process's top-k."""
    import shutil

    from gradtrace.attribution.gram_cache import MIN_BYTES_ENV, load_gram

    shutil.copytree(stores / "train", tmp_path / "train")
    args = ["--train", str(tmp_path / "train"), "--queries", str(stores / "queries"), "--weights",
            str(stores / "w.json"), "--top-k", "10", "--no-progress", "--no-report"]
    assert main(["attribute", *args, "--out", str(tmp_path / "plain")]) == 0  # below the size kept: no blocks
    assert not (tmp_path / "train" / "gram").exists()
    monkeypatch.setenv(MIN_BYTES_ENV, "0")
    _torchrun(args + ["--out", str(tmp_path / "two")], [str(tmp_path)])
    doc = json.loads((tmp_path / "train" / "gram" / "per-group.json").read_text())
    assert doc["ranks"] == 2
    x = np.asarray(FeatureStore.open(tmp_path / "train").features, dtype=np.float64)
    gram, state = load_gram(FeatureStore.open(tmp_path / "train"), "per-group")
    assert state == "hit"
    for block, (_, s, e) in zip(gram.blocks, FeatureStore.open(tmp_path / "train").group_slices):
        np.testing.assert_allclose(block, x[:, s:e].T @ x[:, s:e], rtol=1e-13)
    assert main(["attribute", *args, "--out", str(tmp_path / "one")]) == 0
    _torchrun(args + ["--out", str(tmp_path / "again")], [str(tmp_path)])
    for out, state in (("two", "written"), ("one", "hit"), ("again", "hit")):
        assert _read(tmp_path / out)[0]["manifest"]["method"]["gram_cache"] == state
    _assert_same(tmp_path / "two", tmp_path / "plain")
    _assert_same(tmp_path / "again", tmp_path / "one")
    one, plain = _read(tmp_path / "one")[1], _read(tmp_path / "plain")[1]
    np.testing.assert_array_equal(one["topk_ids.npy"], plain["topk_ids.npy"])
