"""`gradtrace eval mislabel` end to end on digits with a tiny ResNet: the flips, the model trained on them (equal to
a plain training run on a hand-relabelled copy of the data), the corrupted-label features, self-influence against a
dense numpy Φ K Φᵀ built from the stored features, AUC against sklearn, the top-10% count, resumption, and bad
input in one line with exit 2, and a method that brings its own per-group self-influence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from gradtrace.adapters import get_adapter
from gradtrace.adapters.classifier import train as train_classifier
from gradtrace.attribution import fit_method
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.evaluate.mislabel import mislabel_run
from gradtrace.features.featurize import FeatureSpec
from gradtrace.features.store import FeatureStore
from gradtrace.methods import ModelMethod, ModelSession, register_method
from gradtrace.methods.registry import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

N_DATA, TRAIN = 200, np.arange(0, 160)
QUIET = ["--no-progress"]
ARGS = ["--dim", "64", "--num-learning", "30", "--learn-steps", "20", "--bootstrap", "50", *QUIET]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("mislabel")
    (root / "train.txt").write_text("\n".join(map(str, TRAIN)) + "\n")
    assert main(["train", "--adapter", "classifier", "--data", "digits", "--n", str(N_DATA), "--ids",
                 str(root / "train.txt"), "--steps", "30", "--batch-size", "32", "--lr", "0.03", "--model-options",
                 '{"widths": [4, 8], "blocks": [1, 1]}', "--out", str(root / "run"), *QUIET]) == 0
    assert main(["eval", "mislabel", "--run", str(root / "run"), "--out", str(root / "ml"), *ARGS]) == 0
    return root


def dense_self_influence(phi: np.ndarray, slices, method: str, kernel: str, c: float) -> np.ndarray:
    """(N, M) diag_j(Φ_j (Φ K)_jᵀ) with K built explicitly (I, shared or per-group damped inverse Gram)."""
    k = phi.shape[1]
    kmat = np.eye(k)
    if method == "trak":
        kmat = np.zeros((k, k))
        for s, e in [(0, k)] if kernel == "shared" else [(s, e) for _, s, e in slices]:
            g = phi[:, s:e].T @ phi[:, s:e]
            kmat[s:e, s:e] = np.linalg.inv(g + c * np.mean(np.diag(g)) * np.eye(e - s))
    psi = phi @ kmat
    return np.stack([np.einsum("nk,nk->n", phi[:, s:e], psi[:, s:e]) for _, s, e in slices], axis=1)


def test_flips_model_and_features_use_the_corrupted_labels(done):
    ml = done / "ml"
    flips = json.loads((ml / "flips.json").read_text())
    ds = load_dataset("digits", n=N_DATA)
    true = np.array([int(m["label"]) for m in ds.subset(TRAIN).metadata])
    flipped_ids = np.array(flips["flipped_ids"])
    assert len(flipped_ids) == 16 and np.isin(flipped_ids, TRAIN).all()
    assert flips["true"] == true[flipped_ids].tolist()
    assert all(a != b for a, b in zip(flips["true"], flips["noisy"]))
    noisy = true.copy()
    noisy[flipped_ids] = flips["noisy"]
    # the stored model = a plain training run of the same recipe on a copy of the data relabelled by hand
    adapter = get_adapter("classifier")
    run = adapter.load(done / "run")
    relabelled = ds.subset(ds.ids)
    for i, y in zip(flipped_ids, flips["noisy"]):
        relabelled.metadata[int(i)]["label"] = str(y)
    want = train_classifier(run.model_config, relabelled, run.config["train_config"], ids=TRAIN, progress=False)
    got = adapter.load(ml / "model").model
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name
    train = FeatureStore.open(ml / "features" / "train")
    learn = FeatureStore.open(ml / "features" / "learn")
    assert train.ids.tolist() == TRAIN.tolist() and train.cond.tolist() == noisy.tolist()
    assert not np.isin(learn.ids, TRAIN).any() and len(learn.ids) == 30
    assert learn.cond.tolist() == [int(ds.metadata[int(i)]["label"]) for i in learn.ids]  # their own labels
    assert train.settings["measurement"]["name"] == "margin"


def test_self_influence_auc_and_top_fraction_match_independent_computations(done):
    ml = done / "ml"
    doc = json.loads((ml / "mislabel.json").read_text())
    scores = np.load(ml / "self_influence.npz")
    train = FeatureStore.open(ml / "features" / "train")
    phi = np.asarray(train.features, dtype=np.float64)
    flipped = np.isin(TRAIN, json.loads((ml / "flips.json").read_text())["flipped_ids"])
    assert scores["flipped"].tolist() == flipped.tolist() and scores["ids"].tolist() == TRAIN.tolist()
    assert [(r["method"], r["kernel"]) for r in doc["results"]] == [("tracin", "identity"), ("trak", "shared"),
                                                                   ("trak", "per-group")]
    for r in doc["results"]:
        dense = dense_self_influence(phi, train.group_slices, r["method"], r["kernel"], r["c"])
        w = np.array([r["learned_weights"]["weights"][n] for n in train.group_names])
        saved = json.loads((ml / "weights" / f"{r['method']}-{r['kernel']}.json").read_text())["weights"]
        assert list(saved.values()) == pytest.approx(w.tolist())
        key = f"{r['method']}/{r['kernel']}"
        for name, want in (("uniform", dense.sum(1)), ("learned", dense @ w)):
            got = scores[f"{key}/{name}"]
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
            assert r["scores"][name]["auc"] == pytest.approx(roc_auc_score(flipped, got), abs=1e-12)
            top = np.argsort(-got, kind="stable")[:16]  # the top 10% of 160
            assert r["scores"][name]["top_found"] == pytest.approx(flipped[top].sum() / flipped.sum())
        assert r["paired"]["learned - uniform"]["auc"] == pytest.approx(
            r["scores"]["learned"]["auc"] - r["scores"]["uniform"]["auc"])
    # self-influence finds flipped labels better than chance (AUC 0.5) even on this tiny run (measured: 0.67)
    assert doc["results"][1]["scores"]["uniform"]["auc"] > 0.6


def test_rerun_resumes_without_retraining(done, capsys):
    config = done / "ml" / "model" / "config.json"
    before = (config.stat().st_mtime_ns, json.loads((done / "ml" / "mislabel.json").read_text())["results"])
    assert main(["eval", "mislabel", "--run", str(done / "run"), "--out", str(done / "ml"), *ARGS]) == 0
    assert "| trak | per-group |" in capsys.readouterr().out
    after = json.loads((done / "ml" / "mislabel.json").read_text())["results"]
    assert config.stat().st_mtime_ns == before[0]
    assert [r["scores"] for r in after] == [r["scores"] for r in before[1]]


def test_bad_input_is_one_line_and_exit_2(done, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), mode="L").save(flat / f"{i}.png")
    assert main(["train", "--data", "digits", "--n", "16", "--steps", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "unet"), *QUIET]) == 0
    run = ["--run", str(done / "run")]
    cases = [
        (["--run", str(tmp_path / "unet"), "--out", str(tmp_path / "a")], "without class labels"),
        ([*run, "--fraction", "0", "--out", str(tmp_path / "b")], "strictly between 0 and 1"),
        ([*run, "--fraction", "1.5", "--out", str(tmp_path / "c")], "strictly between 0 and 1"),
        ([*run, "--learning-data", f"imagefolder:{flat}", "--out", str(tmp_path / "d")], "has no 'label' label"),
        ([*run, "--methods", "trak", "--out", str(tmp_path / "e")], "needs a kernel"),
        ([*run, "--out", str(done / "ml"), "--fraction", "0.2"], "made with other settings"),
    ]
    for argv, needle in cases:
        code = main(["eval", "mislabel", *argv, *QUIET])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (argv, err)
    for name in "abcde":
        assert not (tmp_path / name).exists()


def test_a_method_with_its_own_self_influence_plugs_in(done):
    """A method that needs the model (as EK-FAC is) gives per-group self-influence (N, M) and the learning queries'
    contributions the weight learner uses; the stage ranks by exactly its numbers."""
    train = FeatureStore.open(done / "ml" / "features" / "train")
    learn = FeatureStore.open(done / "ml" / "features" / "learn")
    phi = np.asarray(train.features, dtype=np.float64)
    want = 3.0 * dense_self_influence(phi, train.group_slices, "trak", "per-group", 0.5)
    seen = {}

    class Session(ModelSession):
        def contributions(self, queries, c):
            fitted = fit_method(train, "trak", kernel="per-group", c=0.5, progress=False)
            return fitted.contributions(learn.features).astype(np.float64)

        def self_contributions(self, c, *, measurement=False):
            seen.update(method=self.method.name, kernel=self.method.kernel_kind, n=len(self.train.ids))
            return want

    class Scaled(ModelMethod):
        name, kernel_kind = "scaled", "per-group"

        def session(self, checkpoint, *, default_factors, examples=None, progress=True):
            return Session(self, checkpoint, examples=examples, progress=progress)

    register_method("scaled", lambda **options: Scaled(**options))
    try:
        doc = mislabel_run(done / "run", done / "ml", methods="scaled", feature_spec=FeatureSpec(total_dim=64,
                           measurement=None), num_learning=30, learn_steps=20, n_bootstrap=50, progress=False)
    finally:
        METHODS.pop("scaled")
    assert seen == {"method": "scaled", "kernel": "per-group", "n": len(TRAIN)}
    r = doc["results"][0]
    w = np.array([r["learned_weights"]["weights"][n] for n in train.group_names])
    scores = np.load(done / "ml" / "self_influence.npz")
    np.testing.assert_allclose(scores["scaled/per-group/uniform"], want.sum(1), rtol=1e-12)
    np.testing.assert_allclose(scores["scaled/per-group/learned"], want @ w, rtol=1e-12)
    flipped = scores["flipped"]
    assert r["scores"]["uniform"]["auc"] == pytest.approx(roc_auc_score(flipped, want.sum(1)), abs=1e-12)
