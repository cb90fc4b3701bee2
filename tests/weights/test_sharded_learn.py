"""learn-weights under torchrun: each rank fits Ψ of its rows, every pass over Ψ is merged over gloo, the steps run
identically on every rank, the last rank writes the weights file. Checked against one process on the same stores.

Tolerances. Sums over rows are added in another order (each rank's partial sum, then their sum):
- the float64 ones (the Gram blocks of K, the dense path's and the λ search's noise) differ from one process's in the
  last bits of float64; Ψ's float32 rows come out the same bits here. The dense learner and the λ search: rtol 1e-9.
- ΨᵀΨ of the lazy learner takes float32 products per row chunk (summed in float64 across chunks), and a rank's
  chunks start at its first row, not at one process's chunk boundaries: S, hence G_q and the noise term, agree to
  float32 rounding (measured 5e-8 relative on S). The lazy learner's weights, θ and losses: rtol 1e-6.
The selected top-k sets, the pool passes and rollbacks are compared exactly.
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from fixtures.ranks import synthetic_settings, torchrun, write_store
from gradtrace.attribution import fit_method
from gradtrace.cli import main
from gradtrace.features.store import FeatureStore
from gradtrace.methods.rows import ShardRows
from gradtrace.weights import learn_weights
from gradtrace.weights.psi_passes import PsiSource, top_pass
from gradtrace.weights.row_source import RowSource, merge_top

N, K, GROUPS, Q, CHUNK = 600, 48, 4, 16, 64  # 10 chunks, the last one short
RTOL = 1e-9       # float64 sums in another order
RTOL_LAZY = 1e-6  # ΨᵀΨ's float32 chunk products over other chunks


def _features(n, seed):
    """Clustered rows whose groups carry the clusters unequally (so the weights move away from uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, K)) * np.repeat([2.0, 1.0, 0.3, 0.1], K // GROUPS)
    scale = np.exp(0.5 * rng.standard_normal((n, 1)))
    return (scale * (centres[np.arange(n) % 20] + rng.standard_normal((n, K)))).astype(np.float32)


def _store(path, feats, ids, rank=0, world=1, measurement="loss"):
    scale = np.exp(np.sin(np.arange(len(ids)))) if measurement == "das" else None  # DAS's per-example factor
    return write_store(path, synthetic_settings(K, GROUPS, CHUNK, measurement), feats, ids, rank, world, scale)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded-learn")
    train, queries = _features(N, 0), _features(Q, 1)
    ids = np.arange(N) * 3 + 5  # ids are not row numbers
    _store(root / "train", train, ids)
    _store(root / "queries", queries, np.arange(Q) + 10_000)
    _store(root / "das" / "train", train, ids, measurement="das")
    _store(root / "das" / "queries", queries, np.arange(Q) + 10_000, measurement="das")
    for r in (0, 1):  # two machines without a shared filesystem: one partial store each, at the same path
        _store(root / f"node{r}" / "train", train, ids, rank=r, world=2)
        _store(root / f"node{r}" / "queries", queries, np.arange(Q) + 10_000)
    return root


def _learn_cli(args):
    return ["-m", "gradtrace.cli", "--", "learn-weights", *args]


def _doc(path):
    return json.loads(path.read_text())


def _top_sets(train_store, doc, queries_store, k):
    """The top-k rows per query under the file's weights and λ, from a float64 dense scoring of every row."""
    prov = doc["provenance"]
    fitted = fit_method(FeatureStore.open(train_store), prov["method"], kernel="per-group", c=prov["lambda_c"],
                        progress=False)
    w = np.array([doc["weights"][f"g{j}"] for j in range(GROUPS)])
    q = np.asarray(FeatureStore.open(queries_store).features, dtype=np.float64) * np.repeat(w, K // GROUPS)
    scores = q @ np.asarray(fitted.psi, dtype=np.float64).T
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in scores]


def _assert_same(two, one, stores, k=10):
    a, b = _doc(two), _doc(one)
    pa, pb = a["provenance"], b["provenance"]
    assert pa["ranks"] == 2 and "ranks" not in pb
    assert pa["base_method"]["N"] == N == pb["learner"]["N"] == pa["learner"]["N"]
    assert pa["learner"]["path"] == pb["learner"]["path"]
    np.testing.assert_allclose([a["weights"][g] for g in b["weights"]], list(b["weights"].values()), rtol=RTOL)
    assert pa["lambda_c"] == pb["lambda_c"]
    if pb["lambda_grid"] is not None:  # the λ search's losses, c by c
        np.testing.assert_allclose(np.array(pa["lambda_grid"]), np.array(pb["lambda_grid"]), rtol=RTOL)
    for key in ("loss_first", "loss_last"):
        np.testing.assert_allclose(pa[key], pb[key], rtol=RTOL)
    np.testing.assert_allclose(pa["learner"]["final_loss"], pb["learner"]["final_loss"], rtol=RTOL)
    assert (pa["guard"] is None) == (pb["guard"] is None)
    if pb["guard"] is not None:
        assert pa["guard"]["shrink"] == pb["guard"]["shrink"]
        np.testing.assert_allclose(list(pa["guard"]["gain_by_shrink"].values()),
                                   list(pb["guard"]["gain_by_shrink"].values()), rtol=1e-7, atol=1e-12)
    train, queries = stores / "train", stores / "queries"
    assert _top_sets(train, a, queries, k) == _top_sets(train, b, queries, k)


@pytest.mark.parametrize("method,extra", [("trak", ["--guard", "none"]), ("trak", []), ("tracin", ["--guard", "none"]),
                                          ("das", ["--guard", "none"])])
def test_two_ranks_learn_the_weights_of_one_process(stores, tmp_path, method, extra):
    """The default λ search (auto) and the dense learner, without and with the holdout guard (the default, auto);
    TracIn (no kernel); DAS (each row of Ψ times its example's factor, read for the rank's rows)."""
    where = stores / "das" if method == "das" else stores
    args = ["--train", str(where / "train"), "--queries", str(where / "queries"), "--method", method,
            "--kernel", "per-group", "--steps", "60", "--lr", "0.1", "--no-progress", *extra]
    assert main(["learn-weights", *args, "--out", str(tmp_path / "one.json")]) == 0
    torchrun(_learn_cli(args + ["--out", str(tmp_path / "two.json")]), [str(tmp_path)])
    _assert_same(tmp_path / "two.json", tmp_path / "one.json", where)
    one = _doc(tmp_path / "one.json")
    assert one["weights"] != {f"g{j}": 0.25 for j in range(GROUPS)} or extra != ["--guard", "none"]
    assert one["provenance"]["learner"]["guard_mode"] == ("none" if extra else "holdout")


def test_two_machines_learn_on_their_partial_stores(stores, tmp_path):
    args = ["--train", "train", "--queries", "queries", "--method", "trak", "--kernel", "shared", "--steps", "40",
            "--no-progress", "--out", "w.json"]
    assert main(["learn-weights", "--train", str(stores / "train"), "--queries", str(stores / "queries"),
                 *args[4:-1], str(tmp_path / "one.json")]) == 0
    torchrun(_learn_cli(args), [str(stores / "node0"), str(stores / "node1")])
    a, b = _doc(stores / "node1" / "w.json"), _doc(tmp_path / "one.json")  # the last rank (node 1) writes
    assert not (stores / "node0" / "w.json").exists()
    assert a["provenance"]["ranks"] == 2
    np.testing.assert_allclose([a["weights"][g] for g in b["weights"]], list(b["weights"].values()), rtol=RTOL)
    np.testing.assert_allclose(a["provenance"]["loss_last"], b["provenance"]["loss_last"], rtol=RTOL)
    assert a["provenance"]["lambda_c"] == b["provenance"]["lambda_c"]


LAZY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from gradtrace.attribution.shard_fit import fit_shard, shard_ranges, shared_gram
    from gradtrace.features.store import FeatureStore
    from gradtrace.methods import configure
    from gradtrace.methods.rows import ShardRows
    from gradtrace.ranks import process_group, rank_and_world
    from gradtrace.weights import learn_weights
    from gradtrace.weights.row_source import Shard

    train_path, query_path, out, guard = sys.argv[1:5]
    rank, world = rank_and_world()
    with process_group(world, "test") as group:
        train = FeatureStore.open(train_path)
        base = configure("trak", kernel="per-group", c=0.01)
        rows = ShardRows(train.features, shard_ranges(train, rank, world))
        blocks, _ = shared_gram(train, base, rows, rank=rank, world=world, group=group)
        fitted = fit_shard(train, base, rows, blocks)
        result = learn_weights(fitted, np.asarray(FeatureStore.open(query_path).features), k=5, steps=60, lr=0.1,
                               memory_budget_bytes=1, pool_size=12, guard=guard, progress=False,
                               shard=Shard(view=rows, n=len(train.ids), group=group))
    json.dump({"weights": result.weights.tolist(), "theta": result.theta.tolist(), "curve": result.loss_curve,
               "info": result.info}, open(f"{out}.{rank}.json", "w"), default=str)
""")


@pytest.mark.parametrize("guard", ["none", "holdout"])
def test_the_lazy_learner_over_two_ranks_is_the_one_process_learner(stores, tmp_path, guard):
    """Small pools (12 rows for k = 5) so that refreshes find misses and roll back, the float64 fallback and the
    shortlist checks run: every rank takes the same steps as one process."""
    train = FeatureStore.open(stores / "train")
    one = learn_weights(fit_method(train, "trak", kernel="per-group", c=0.01, progress=False),
                        np.asarray(FeatureStore.open(stores / "queries").features), k=5, steps=60, lr=0.1,
                        memory_budget_bytes=1, pool_size=12, guard=guard, progress=False)
    script = tmp_path / "learn.py"
    script.write_text(LAZY_SCRIPT)
    torchrun([str(script), str(stores / "train"), str(stores / "queries"), str(tmp_path / "out"), guard],
              [str(tmp_path)])
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["curve"] == ranks[1]["curve"]  # same bits
    got = ranks[1]
    assert got["info"]["path"] == one.info["path"] == "scalable"
    assert got["info"]["pool"]["passes"] == one.info["pool"]["passes"]
    assert got["info"]["pool"]["rollbacks"] == one.info["pool"]["rollbacks"]
    assert one.info["pool"]["passes"] > 2 and one.info["pool"]["misses_found"] + one.info["pool"][
        "shortlist_misses"] > 0, "the pools must be refreshed and miss rows, or the test checks too little"
    np.testing.assert_allclose(got["weights"], one.weights, rtol=RTOL_LAZY)
    np.testing.assert_allclose(got["theta"], one.theta, rtol=RTOL_LAZY, atol=1e-9)
    np.testing.assert_allclose(got["curve"], one.loss_curve, rtol=RTOL_LAZY)
    np.testing.assert_allclose(got["info"]["final_loss"], one.info["final_loss"], rtol=RTOL_LAZY)


def test_the_merge_of_ranks_top_rows_is_the_top_of_all_rows():
    """Each 'rank' (row ranges of a view) takes its top-C with the float32 pass; merged, they are the plain numpy
    top-C over all rows: descending score, ties to the lower row (the data hold exact ties)."""
    rng = np.random.default_rng(3)
    psi = rng.integers(-3, 4, size=(500, 8)).astype(np.float32)  # small integers: many exactly tied scores
    qw = rng.integers(-2, 3, size=(6, 8)).astype(np.float32)
    take = 40
    dense = qw.astype(np.float64) @ psi.T.astype(np.float64)
    want = np.lexsort((np.broadcast_to(np.arange(500), dense.shape), -dense), axis=1)[:, :take]
    for ranges in ([[(0, 250)], [(250, 500)]], [[(0, 64), (128, 192), (256, 320)], [(64, 128), (192, 256),
                                                                                   (320, 500)]]):
        parts = []
        for r in ranges:
            view = ShardRows(psi, r)
            idx, vals = top_pass(PsiSource(np.asarray(view[0:len(view)]), torch.device("cpu"), chunk_rows=37), qw,
                                 take)
            parts.append((view.global_rows(idx), vals))
        idx, vals = merge_top(parts, take)
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(vals, np.take_along_axis(dense, want, axis=1).astype(np.float32))


def test_local_rows_inverts_global_rows_and_contributions_are_the_pairs_products():
    rng = np.random.default_rng(4)
    source = rng.standard_normal((300, 6)).astype(np.float32)
    view = ShardRows(source, [(10, 50), (100, 180), (250, 300)])
    local = np.arange(len(view))
    held, back = view.local_rows(view.global_rows(local))
    assert held.all() and (back == local).all()
    held, _ = view.local_rows(np.array([0, 9, 50, 99, 180, 249, 10, 299]))
    assert held.tolist() == [False] * 6 + [True, True]
    from gradtrace.methods import FittedMethod
    fitted = FittedMethod(psi=source, group_slices=[("a", 0, 2), ("b", 2, 6)], info={})
    phi = rng.standard_normal((3, 6))
    qs, rows = np.array([2, 0, 2, 1]), np.array([7, 299, 0, 7])
    got = RowSource(fitted).contributions(phi, qs, rows)
    want = np.stack([[phi[q, :2] @ source[n, :2].astype(np.float64), phi[q, 2:] @ source[n, 2:].astype(np.float64)]
                     for q, n in zip(qs, rows)])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_refusal_on_a_rank_stops_every_rank_with_its_one_line_message(stores, tmp_path):
    (code, err), = torchrun(_learn_cli(["--train", str(stores / "node0" / "train"), "--queries",
                                         str(stores / "queries"), "--no-progress", "--out", str(tmp_path / "w.json")]),
                             [str(tmp_path)], ok=False)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("gradtrace learn-weights: error:")]
    # rank 1's chunks are not in node 0's partial store: rank 1 says so, rank 0 stops with the same reason (whichever
    # exits first, torchrun then ends the other, so one or both lines are printed), exit code 2 (a UserError)
    assert 1 <= len(lines) <= 2 and all("rank 1 of 2" in line for line in lines), err[-2000:]
    assert "exitcode  : 2" in err and "Traceback" not in err.split("torch/distributed/elastic")[0]
    assert not (tmp_path / "w.json").exists()


@pytest.mark.parametrize("extra,says", [(["--generate", "8"], "make the learning queries first"),
                                        (["--objective", "family", "--family", "style"], "not split over ranks"),
                                        (["--family", "style"], "--objective family is not split over ranks")])
def test_what_is_not_split_is_refused_under_torchrun_in_one_line(stores, tmp_path, monkeypatch, capsys, extra,
                                                                says):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any rendezvous: no process group is needed
    source = [] if extra[0] == "--generate" else ["--queries", str(stores / "queries")]
    code = main(["learn-weights", "--train", str(stores / "train"), *source, *extra, "--no-progress",
                 "--out", str(tmp_path / "w.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "w.json").exists()
