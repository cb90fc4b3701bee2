"""The classifier benchmark at its smallest (one model, tiny settings): every LDS and mislabel row is produced, and
the TracIn rows equal an independent computation (each subset model's margin by a direct forward pass, scipy's
Spearman; sklearn's AUC on the saved self-influence); the EK-FAC rows equal the CLI's `attribute-ekfac` + `eval lds
--attributions` with the row's c and saved weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from gradtrace.adapters import get_adapter
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.features.store import FeatureStore

BENCH = Path(__file__).resolve().parents[2] / "bench"
TINY = ["models=resnet", "n_train=60", "steps=15", "subsets=3", "n_heldout=6", "n_learn=6", "dim=64",
        "learn_steps=5", "bootstrap=30", "mislabel_measurements=margin"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The script run as `python bench/bench_classifier.py --quick` is, tiny (one torch thread, as the CLI below)."""
    out = tmp_path_factory.mktemp("bench") / "classifier"
    argv = ["--quick", "--out", str(out), "--no-progress"] + [a for kv in TINY for a in ("--set", kv)]
    done = subprocess.run([sys.executable, str(BENCH / "bench_classifier.py"), *argv],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads((out / "results.json").read_text())


def test_rows_and_the_tracin_figures_match_an_independent_computation(bench):
    out, results = bench
    m = results["models"]["resnet"]
    every = [tuple(mk) for mk in results["methods"]] + [("ekfac", "ekfac")]
    assert [(r["method"], r["kernel"]) for r in m["rows"]] == [mk for mk in every
                                                              for _ in range(1 + len(results["guard_rows"]))]
    assert [(r["method"], r["kernel"]) for r in m["mislabel"]] == every
    assert all(r["seconds"] >= 0 for r in m["rows"] + m["mislabel"])
    assert results["estimated_full_minutes"] > 0
    # LDS of uniform TracIn: Φ_q Φᵀ summed over each subset, against each subset model's margin on the query
    root = out / "resnet"
    train, held = FeatureStore.open(root / "features" / "train"), FeatureStore.open(root / "features" / "heldout")
    scores = np.asarray(held.features, dtype=np.float64) @ np.asarray(train.features, dtype=np.float64).T
    subsets = np.load(root / "retrain" / "subsets.npy")
    mask = np.stack([np.isin(train.ids, s) for s in subsets]).astype(np.float64)
    ds = load_dataset("digits").subset(held.ids)
    labels = np.array([int(x["label"]) for x in ds.metadata])
    margins = []
    for path in sorted((root / "retrain" / "models").iterdir()):
        with torch.no_grad():
            p = torch.softmax(get_adapter("classifier").load(path).model(ds.images).double(), 1).numpy()
        p = p[np.arange(len(labels)), labels]
        margins.append(np.log(p / (1 - p)))
    pred, margins = mask @ scores.T, np.array(margins)
    per_q = np.array([spearmanr(pred[:, j], margins[:, j]).statistic for j in range(len(labels))])
    row = m["rows"][0]
    assert row["weights"] == "uniform" and row["lds"]["mean"] == pytest.approx(np.nanmean(per_q), rel=1e-6)
    # mislabel: sklearn's AUC on the saved self-influence; uniform TracIn self-influence = ‖φ(x_n)‖² per group
    z = np.load(root / "mislabel-margin" / "self_influence.npz")
    phi = np.asarray(FeatureStore.open(root / "mislabel-margin" / "features" / "train").features, dtype=np.float64)
    np.testing.assert_allclose(z["tracin/identity/uniform"], (phi ** 2).sum(1), rtol=1e-4)
    for r in m["mislabel"]:
        for name in ("uniform", "learned"):
            assert r["scores"][name]["auc"] == pytest.approx(
                roc_auc_score(z["flipped"], z[f"{r['method']}/{r['kernel']}/{name}"]), abs=1e-12)


def test_ekfac_rows_equal_the_cli(bench, tmp_path):
    out, _ = bench
    m = json.loads((out / "results.json").read_text())["models"]["resnet"]
    root = out / "resnet"
    held = FeatureStore.open(root / "features" / "heldout")
    (tmp_path / "held.txt").write_text("\n".join(map(str, held.ids)) + "\n")
    rows = [r for r in m["rows"] if r["method"] == "ekfac"]
    c = rows[0]["c"]
    assert c in [row[0] for row in rows[0]["lambda_grid"]]
    for r, weights in zip(rows, ([], ["--weights", str(root / "weights" / "ekfac.json")])):
        attr, lds = tmp_path / f"attr-{r['weights']}", tmp_path / f"lds-{r['weights']}"
        assert main(["attribute-ekfac", "--checkpoint", str(root / "run"), "--data", "digits", "--ids",
                     str(tmp_path / "held.txt"), "--factors", str(root / "ekfac-factors"), "--lambda-c", str(c),
                     *weights, "--out", str(attr), "--no-progress"]) == 0
        assert main(["eval", "lds", "--run", str(root / "run"), "--retrain", str(root / "retrain"),
                     "--attributions", str(attr), "--out", str(lds), "--no-progress"]) == 0
        got = json.loads((lds / "lds.json").read_text())["lds"]["mean"]
        assert r["lds"]["mean"] == pytest.approx(got, rel=1e-6), r["weights"]
