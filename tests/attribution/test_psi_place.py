"""Ψ of a store above the in-memory budget (`gradtrace.attribution.psi_place`): `learn-weights` (with the label-free
λ search) reads it from a temporary memmap beside the store and learns the same weights, bit for bit, as with Ψ in
memory; the file is gone afterwards, a dead process's leftover is removed, a bad budget is one line."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

import gradtrace.methods.trak as trak_module
from gradtrace.attribution.psi_place import BUDGET_ENV, PSI_NAME, psi_place
from gradtrace.cli import main
from gradtrace.features.store import FeatureStore
from gradtrace.methods import configure

pytestmark = pytest.mark.usefixtures("one_thread")


def _learn(pipeline, out, method="trak"):
    assert main(["learn-weights", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--method",
                 method, "--steps", "20", "--lambda-c", "auto", "--out", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["trak", "tracin"])
def test_psi_on_disk_learns_the_same_weights(pipeline, tmp_path, monkeypatch, method):
    if method == "tracin":  # no λ and no Ψ copy: never spilled, same weights
        monkeypatch.setenv(BUDGET_ENV, "0")
        assert _learn(pipeline, tmp_path / "a.json", method)["weights"] == \
            _learn(pipeline, tmp_path / "b.json", method)["weights"]
        return
    in_memory = _learn(pipeline, tmp_path / "memory.json")
    paths = []
    real = trak_module.allocate_psi

    def spy(n, k, path=None):
        paths.append(path)
        return real(n, k, path)

    monkeypatch.setattr(trak_module, "allocate_psi", spy)
    monkeypatch.setenv(BUDGET_ENV, "0")
    on_disk = _learn(pipeline, tmp_path / "disk.json")
    # every fit (the 9 c values of the λ search, then the learner's) wrote Ψ to a file beside the store
    assert len(paths) == 10 and all(p is not None and p.parent == pipeline / "ft" for p in paths)
    assert not any(p.exists() for p in paths)
    assert on_disk["weights"] == in_memory["weights"]
    for key in ("lambda_c", "lambda_grid", "loss_first", "loss_last"):
        assert on_disk["provenance"][key] == in_memory["provenance"][key]
    assert len(on_disk["provenance"]["lambda_grid"]) == 9


def test_a_dead_process_leftover_is_removed_and_a_live_one_kept(pipeline, monkeypatch):
    host = socket.gethostname().replace(".", "_")
    dead = pipeline / "ft" / f".{PSI_NAME}.{host}-999999999.x1.tmp.npy"
    live = pipeline / "ft" / f".{PSI_NAME}.{host}-{os.getpid()}.y2.tmp.npy"
    for p in (dead, live):
        np.save(p, np.zeros(2))
    monkeypatch.setenv(BUDGET_ENV, "0")
    store = FeatureStore.open(pipeline / "ft")
    with psi_place(store, configure("trak")) as path:
        assert path is not None and path.parent == pipeline / "ft"
    assert not dead.exists() and live.exists() and not path.exists()
    live.unlink()


def test_a_bad_budget_is_one_line(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(BUDGET_ENV, "lots")
    assert main(["learn-weights", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--steps",
                 "2", "--lambda-c", "0.1", "--out", str(tmp_path / "w.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and BUDGET_ENV in err[0] and "'lots'" in err[0]
    assert not (tmp_path / "w.json").exists()
