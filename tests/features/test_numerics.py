"""The numerics of a feature store: every chunk records the torch thread count (device, dtype, versions) it was
computed under; a resume or another rank under another thread count is refused in one line unless
--allow-mixed-numerics (recorded in the manifest); equal thread counts across ranks are fine; a finished store
is read under any thread count. The measured thread-count effect itself (bench/bench_numerics.py) is checked
here on a small store: 1 thread and 2 threads give rows within float32 rounding of each other."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures.unet import build_featurizer, random_inputs, tiny_model
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec, featurize
from gradtrace.features.numerics import current

SPEC = FeatureSpec(total_dim=96, num_timesteps=2, chunk_rows=4)
N = 22


@pytest.fixture
def threads():
    """Set torch's thread count inside a test (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _run(out, rank=0, world=1, **kwargs):
    model, sched = tiny_model("unconditional")
    x, ids, _ = random_inputs(model, N)
    featurizer, _ = build_featurizer(model, sched, SPEC)
    return featurize(featurizer, x, ids, out, spec=SPEC, model_fingerprint="tiny", progress=False, rank=rank,
                     world=world, **kwargs)


def _chunk_threads(store_dir) -> dict[int, int]:
    out = {}
    for file in store_dir.glob("progress*.json"):
        doc = json.loads(file.read_text())
        out.update({int(c): doc["numerics"][key]["threads"] for c, key in doc["chunk_numerics"].items()})
    return out


def test_every_chunk_records_its_numerics_and_the_manifest_sums_them_up(tmp_path, threads):
    threads(1)
    store = _run(tmp_path / "s")
    assert _chunk_threads(tmp_path / "s") == {c: 1 for c in range(6)}
    assert store.manifest["numerics"] == [current(None, "float32")]
    assert "mixed_numerics_allowed" not in store.manifest


def test_a_resume_under_another_thread_count_is_refused_unless_allowed(tmp_path, threads):
    threads(1)
    _run(tmp_path / "s", stop_after_chunks=2)
    threads(2)
    with pytest.raises(UserError, match=r"other numerics \(threads 1 vs 2\).*OMP_NUM_THREADS=1"):
        _run(tmp_path / "s")
    assert sorted(_chunk_threads(tmp_path / "s")) == [0, 1]  # nothing was written by the refused run
    store = _run(tmp_path / "s", allow_mixed_numerics=True)
    assert store.complete and store.manifest["mixed_numerics_allowed"] is True
    assert [n["threads"] for n in store.manifest["numerics"]] in ([1, 2], [2, 1])
    assert _chunk_threads(tmp_path / "s") == {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 2}


def test_ranks_at_equal_thread_counts_mix_nothing_and_a_rank_at_another_is_refused(tmp_path, threads):
    threads(1)
    _run(tmp_path / "s", 0, 3)
    _run(tmp_path / "s", 2, 3)  # one thread each, like torchrun's ranks
    threads(2)
    with pytest.raises(UserError, match="threads 1 vs 2"):
        _run(tmp_path / "s", 1, 3)
    threads(1)
    assert _run(tmp_path / "s", 1, 3).complete


def test_a_finished_store_is_reused_under_any_thread_count(tmp_path, threads):
    threads(1)
    first = _run(tmp_path / "s")
    before = (tmp_path / "s" / "features.npy").read_bytes()
    threads(2)
    again = _run(tmp_path / "s")
    assert again.complete and (tmp_path / "s" / "features.npy").read_bytes() == before
    assert again.manifest["numerics"] == first.manifest["numerics"]


def test_one_and_two_threads_agree_to_float32_rounding(tmp_path, threads):
    """The promise the README makes across thread counts: the same rows to a relative 1e-5 of the row norm."""
    threads(1)
    one = np.load(_run(tmp_path / "one").path / "features.npy")
    threads(2)
    two = np.load(_run(tmp_path / "two").path / "features.npy")
    scale = np.linalg.norm(one, axis=1, keepdims=True)
    assert np.all(np.abs(one - two) <= 1e-5 * scale)
