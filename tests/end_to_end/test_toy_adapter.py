"""A new kind of model plugs in through the adapter seam alone: a test-only MLP regressor runs featurize →
attribute → learn-weights → LDS through the public API, each stage checked against a plain computation."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fixtures.toy_adapter import NAME, targets
from gradtrace import (
    AttributeSpec,
    EvalLDSSpec,
    FeaturizeSpec,
    LearnWeightsSpec,
    RetrainSpec,
    TrainSpec,
    attribute_run,
    eval_lds,
    featurize_run,
    get_adapter,
    learn_weights_run,
    retrain,
    train_run,
)
from gradtrace.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

N_DATA, TRAIN, HELD, LEARN = 140, np.arange(0, 80), np.arange(80, 100), np.arange(100, 140)
C = 0.05


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    run = str(train_run(TrainSpec(data="digits", n=N_DATA, ids=TRAIN, out=str(root / "run"), adapter=NAME,
                                  steps=150, batch_size=16), progress=False))
    common = dict(checkpoint=run, groups="tensor", projection="identity", timesteps=1)
    ft = featurize_run(FeaturizeSpec(out=str(root / "ft"), **common), progress=False)
    fq = featurize_run(FeaturizeSpec(out=str(root / "fq"), data="digits", n=N_DATA, ids=HELD, **common),
                       progress=False)
    fl = featurize_run(FeaturizeSpec(out=str(root / "fl"), data="digits", n=N_DATA, ids=LEARN, **common),
                       progress=False)
    return root, run, ft, fq, fl


def autograd_features(run, ids) -> np.ndarray:
    """Each example's gradient of its squared error, by a plain autograd loop (tensor order = store order)."""
    ckpt = get_adapter(NAME).load(run)
    ds = load_dataset("digits", n=N_DATA)
    rows = ds.index_of(np.asarray(ids))
    x, y = ds.images[rows], targets(ds.attribute_codes()[rows])
    out = []
    for i in range(len(rows)):
        ckpt.model.zero_grad()
        ((ckpt.model(x[i:i + 1])[0] - y[i]) ** 2).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in ckpt.model.parameters()]).numpy())
    return np.stack(out).astype(np.float64)


def per_group_trak(phi: np.ndarray, q: np.ndarray, slices, c: float) -> np.ndarray:
    """(Q, N, M) per-group TRAK contributions, block by block in float64."""
    out = []
    for _, s, e in slices:
        g = phi[:, s:e].T @ phi[:, s:e]
        k = np.linalg.inv(g + c * np.mean(np.diag(g)) * np.eye(e - s))
        out.append(q[:, s:e] @ k @ phi[:, s:e].T)
    return np.stack(out, axis=-1)


def snr(contrib: np.ndarray, w: np.ndarray, k: int = 10) -> float:
    """mean_q −(mean of the top-k τ_w(q, ·)) / ‖τ_w(q, ·)‖₂, the label-free objective, in numpy."""
    tau = (contrib * w).sum(-1)
    top = -np.sort(-tau, axis=1)[:, :k]
    return float(np.mean(-top.mean(1) / np.linalg.norm(tau, axis=1)))


def test_features_are_the_autograd_gradients(toy):
    _, run, ft, fq, _ = toy
    assert ft.group_names == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    assert ft.manifest["provenance"]["adapter"] == NAME
    np.testing.assert_allclose(np.asarray(ft.features), autograd_features(run, TRAIN), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(fq.features), autograd_features(run, HELD), rtol=1e-4, atol=1e-7)


def test_attribute_learn_weights_and_lds_match_plain_computations(toy):
    root, run, ft, fq, fl = toy
    phi, q, ql = (autograd_features(run, ids) for ids in (TRAIN, HELD, LEARN))
    contrib = per_group_trak(phi, q, ft.group_slices, C)
    # attribute: the top-5 and their per-group contributions
    doc = attribute_run(AttributeSpec(train=str(ft.path), queries=str(fq.path), out=str(root / "attr"),
                                      lambda_c=C, top_k=5, report=False), progress=False)
    scores = contrib.sum(-1)
    for qi, row in enumerate(doc["queries"]):
        want = np.argsort(-scores[qi], kind="stable")[:5]
        assert [t["train_id"] for t in row["top"]] == TRAIN[want].tolist()
        for t, n in zip(row["top"], want):
            assert t["score"] == pytest.approx(scores[qi, n], rel=1e-3, abs=1e-6)
            assert list(t["contributions"].values()) == pytest.approx(contrib[qi, n].tolist(), rel=1e-3, abs=1e-6)
    # learn-weights on the learning queries: the SNR objective, computed here, is lower than uniform's
    path, wdoc = learn_weights_run(LearnWeightsSpec(train=str(ft.path), queries=str(fl.path), lambda_c=C,
                                                    steps=100, lr=0.1), progress=False)
    w = np.array([wdoc["weights"][n] for n in ft.group_names])
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    learn_contrib = per_group_trak(phi, ql, ft.group_slices, C)
    assert snr(learn_contrib, w) < snr(learn_contrib, np.full(4, 0.25))
    # LDS against retrained models: the squared error of each subset model, computed here
    retrain(RetrainSpec(run=run, subsets=6, out=str(root / "retrain")), progress=False)
    lds = eval_lds(EvalLDSSpec(run=run, retrain=str(root / "retrain"), train_features=str(ft.path),
                               queries=str(fq.path), out=str(root / "lds"), weights=str(path), timesteps=1, draws=1),
                   progress=False)
    manifest = json.loads((root / "retrain" / "manifest.json").read_text())
    subsets = np.load(root / "retrain" / "subsets.npy")
    ds = load_dataset("digits", n=N_DATA)
    rows = ds.index_of(HELD)
    x, y = ds.images[rows], targets(ds.attribute_codes()[rows])
    errors = []
    for job in manifest["settings"]["jobs"]:
        model = get_adapter(NAME).load(root / "retrain" / "models" / job).model
        with torch.no_grad():
            errors.append(((model(x) - y) ** 2).double().numpy())
    weighted = (per_group_trak(phi, q, ft.group_slices, wdoc["provenance"]["lambda_c"]) * w).sum(-1)
    mask = np.stack([np.isin(TRAIN, s) for s in subsets]).astype(np.float64)
    predictions = mask @ weighted.T
    want = [spearmanr(predictions[:, j], -np.array(errors)[:, j]).statistic for j in range(len(HELD))]
    got = [np.nan if v is None else v for v in lds["lds"]["per_query"]]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert lds["manifest"]["model_output"]["name"] == "squared error"
