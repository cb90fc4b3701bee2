"""featurize split over ranks: each rank its chunks (c % world == rank), the last one finishes the store; bytes equal
a single process's; a stopped rank's chunks are redone by a rerun; an unfinished store is refused; a real
2-process torchrun run through the CLI gives the same bytes as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures.unet import build_featurizer, random_inputs, tiny_model
from gradtrace.attribution import fit_method
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec, featurize
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded, like each torchrun rank
SPEC = FeatureSpec(total_dim=96, num_timesteps=2, chunk_rows=4)
N = 22  # 6 chunks, the last one short


def _run(out, rank=None, world=None, **kwargs):
    model, sched = tiny_model("unconditional")
    x, ids, _ = random_inputs(model, N)
    featurizer, _ = build_featurizer(model, sched, SPEC)
    return featurize(featurizer, x, ids, out, spec=SPEC, model_fingerprint="tiny", progress=False, rank=rank,
                     world=world, **kwargs), featurizer


def _files(store_dir):
    return {name: (store_dir / name).read_bytes() for name in ("features.npy", "ids.npy")}


def test_ranks_split_the_chunks_and_the_last_finishes_with_the_same_bytes(tmp_path):
    whole, _ = _run(tmp_path / "whole", 0, 1)
    assert whole.complete
    first, _ = _run(tmp_path / "split", 0, 3)
    assert not first.complete and first.missing_chunks() == [1, 2, 4, 5]
    with pytest.raises(UserError, match="unfinished"):
        FeatureStore.open(tmp_path / "split")
    second, _ = _run(tmp_path / "split", 2, 3)
    assert not second.complete and second.missing_chunks() == [1, 4]
    last, _ = _run(tmp_path / "split", 1, 3)
    assert last.complete
    assert _files(tmp_path / "split") == _files(tmp_path / "whole")
    progress = {f.name for f in (tmp_path / "split").iterdir() if f.name.startswith("progress")}
    assert progress == {"progress.json", "progress-rank1.json", "progress-rank2.json"}
    chunks = json.loads((tmp_path / "split" / "progress-rank2.json").read_text())["chunks"]
    assert sorted(map(int, chunks)) == [2, 5]


def test_a_stopped_rank_is_redone_by_a_rerun_with_any_number_of_ranks(tmp_path, monkeypatch):
    _run(tmp_path / "whole", 0, 1)
    _run(tmp_path / "s", 0, 2)                                # chunks 0, 2, 4
    stopped, _ = _run(tmp_path / "s", 1, 2, stop_after_chunks=1)  # chunk 1 only, then "killed"
    assert stopped.missing_chunks() == [3, 5]
    calls = []
    model, sched = tiny_model("unconditional")
    featurizer, _ = build_featurizer(model, sched, SPEC)
    real = featurizer.features
    monkeypatch.setattr(featurizer, "features", lambda x, ids, c: calls.append(ids.tolist()) or real(x, ids, c))
    x, ids, _ = random_inputs(model, N)
    done = featurize(featurizer, x, ids, tmp_path / "s", spec=SPEC, model_fingerprint="tiny", progress=False,
                     rank=0, world=1)  # one process finishes what the job left
    assert done.complete and calls == [ids[12:16].tolist(), ids[20:22].tolist()]
    assert _files(tmp_path / "s") == _files(tmp_path / "whole")


def test_changed_rows_are_caught_when_the_store_is_finished(tmp_path):
    _run(tmp_path / "s", 0, 2)
    raw = np.load(tmp_path / "s" / "features.npy", mmap_mode="r+")
    raw[0, 0] += 1.0  # a chunk recorded by rank 0 changes on disk before the job ends
    raw.flush()
    del raw
    with pytest.raises(UserError, match="changed after they were written"):
        _run(tmp_path / "s", 1, 2)


def test_a_single_writer_is_refused_while_a_rank_writes(tmp_path):
    store, _ = _run(tmp_path / "s", 0, 2, stop_after_chunks=1)
    settings = store.settings
    holder = FeatureStore.create(tmp_path / "s", settings, store.ids, rank=1, world=2)
    try:
        with pytest.raises(UserError, match="another process is writing"):
            FeatureStore.create(tmp_path / "s", settings, store.ids)
        with pytest.raises(UserError, match="another process is writing"):
            FeatureStore.create(tmp_path / "s", settings, store.ids, rank=1, world=2)
    finally:
        holder.release()


def test_torchrun_two_processes_give_the_bytes_of_one(pipeline, tmp_path):
    args = ["featurize", "--checkpoint", str(pipeline / "run"), "--dim", "64", "--timesteps", "2", "--chunk", "8",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "gradtrace.cli", "--", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    store = FeatureStore.open(tmp_path / "two")
    assert store.complete and (tmp_path / "two" / "progress-rank1.json").exists()
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_shards_of_machines_merge_to_the_unsharded_store_and_scores(tmp_path, capsys):
    _run(tmp_path / "whole", 0, 1)
    _run(tmp_path / "node0", 0, 2)  # a job over two machines without a shared filesystem: one directory each
    _run(tmp_path / "node1", 1, 2)
    assert main(["merge-features", "--shard", str(tmp_path / "node0"), "--out", str(tmp_path / "part"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 chunk(s) are in none of the shards (rows 4..7" in err
    assert main(["merge-features", "--shard", str(tmp_path / "node0"), "--shard", str(tmp_path / "node1"),
                 "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    assert _files(tmp_path / "merged") == _files(tmp_path / "whole")
    merged, whole = FeatureStore.open(tmp_path / "merged"), FeatureStore.open(tmp_path / "whole")
    q = np.asarray(whole.features[:5])
    a = fit_method(merged, "trak", c=0.1, progress=False).topk(q, 4)
    b = fit_method(whole, "trak", c=0.1, progress=False).topk(q, 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
