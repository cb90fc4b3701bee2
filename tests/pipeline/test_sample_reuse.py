"""`sample` reuses a finished samples folder of the same settings and model (so `learn-weights --generate` run
again after a kill does not sample again), and samples again when anything differs or the images were changed."""
import numpy as np
import pytest

from fixtures.reliability import digest, ok
from gradtrace.adapters.diffusion.adapter import TinyUNetAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_reuses_an_identical_finished_folder(tmp_path, monkeypatch):
    ok("train", "--data", "digits", "--n", 8, "--steps", 1, "--batch-size", 4, "--out", tmp_path / "ck")
    args = ["sample", "--checkpoint", tmp_path / "ck", "--num", 3, "--sample-steps", 2, "--out", tmp_path / "s"]
    ok(*args)
    first = digest(tmp_path / "s")
    calls = []
    original = TinyUNetAdapter.sample
    monkeypatch.setattr(TinyUNetAdapter, "sample", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ok(*args)  # the same settings and model: reused as it is
    assert calls == [] and digest(tmp_path / "s") == first
    ok(*args[:-2], "--seed", 1, "--out", tmp_path / "s")  # another seed: sampled again
    assert calls == [1] and digest(tmp_path / "s")["images.npy"] != first["images.npy"]
    ok(*args)
    assert digest(tmp_path / "s") == first
    images = np.load(tmp_path / "s" / "images.npy")
    np.save(tmp_path / "s" / "images.npy", images + 1)  # changed behind its manifest: not reused
    ok(*args)
    assert len(calls) == 3 and digest(tmp_path / "s") == first
