"""New base methods plug in through the method seam alone (`fixtures.toy_method`). A method that works on the model
directly (influence with a diagonal Fisher per group) runs attribute → learn-weights (`--lambda-c auto`) → weighted
attribute (CLI) → report on the test-only MLP, each output against a plain computation: per-example gradients by an
autograd loop written here, the formula in numpy, the label-free λ choice and the weights' objective in numpy; the
stages that need feature stores refuse it in one line. A bilinear kernel on stored features (the diagonal of the
per-group Gram) runs attribute and learn-weights the same way, against the formula in numpy on the stored features."""
import json

import numpy as np
import pytest
import torch

from fixtures.toy_adapter import NAME as ADAPTER, targets
from fixtures.toy_method import KERNEL_NAME, NAME
from gradtrace import (
    AttributeSpec,
    FeaturizeSpec,
    LearnWeightsSpec,
    TrainSpec,
    attribute_run,
    featurize_run,
    get_adapter,
    learn_weights_run,
    train_run,
)
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

N_DATA, TRAIN, HELD, LEARN = 140, np.arange(0, 60), np.arange(60, 75), np.arange(75, 100)
QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-method")
    run = str(train_run(TrainSpec(data="digits", n=N_DATA, ids=TRAIN, out=str(root / "run"), adapter=ADAPTER,
                                  steps=100, batch_size=16), progress=False))
    for name, ids in (("held", HELD), ("learn", LEARN)):
        (root / f"{name}.txt").write_text("\n".join(map(str, ids)) + "\n")
    return root, run


def gradients(run, ids) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Each example's gradient of its squared error by a plain autograd loop, and each tensor's columns."""
    model = get_adapter(ADAPTER).load(run).model
    ds = load_dataset("digits", n=N_DATA)
    rows = ds.index_of(np.asarray(ids))
    x, y = ds.images[rows], targets(ds.attribute_codes()[rows])
    out = []
    for i in range(len(rows)):
        model.zero_grad()
        ((model(x[i:i + 1])[0] - y[i]) ** 2).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy())
    spans, start = [], 0
    for name, p in model.named_parameters():
        spans.append((name, start, start + p.numel()))
        start += p.numel()
    return np.stack(out), spans


def diagonal_influence(gq, gt, spans, c) -> np.ndarray:
    """(Q, N, M): Σ_{p∈j} gq_p gt_p / (F_p + c · mean_j F), F = mean of gt² over the training set."""
    fisher = (gt ** 2).mean(0)
    return np.stack([(gq[:, s:e] / (fisher[s:e] + c * fisher[s:e].mean())) @ gt[:, s:e].T for _, s, e in spans],
                    axis=-1)


def snr(contrib, w, k=10) -> float:
    tau = contrib @ w
    top = -np.sort(-tau, axis=1)[:, :k]
    return float(np.mean(-top.mean(1) / np.linalg.norm(tau, axis=1)))


def test_toy_method_attribute_learn_weights_and_report(toy):
    root, run = toy
    common = dict(method=NAME, checkpoint=run, data="digits", n=N_DATA, groups="tensor", timesteps=1, device="cpu")
    gt, spans = gradients(run, TRAIN)
    gq, _ = gradients(run, HELD)
    gl, _ = gradients(run, LEARN)
    names = [name for name, _, _ in spans]
    # uniform, c given: contributions and scores against numpy, the top-k by those scores
    doc = attribute_run(AttributeSpec(out=str(root / "uniform"), ids=HELD, lambda_c="0.1", top_k=5, **common),
                        progress=False)
    want = diagonal_influence(gq, gt, spans, 0.1)
    assert doc["groups"] == names and doc["manifest"]["method"]["method"] == NAME
    got = np.load(root / "uniform" / "contributions.npy")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(np.load(root / "uniform" / "scores.npy"), want.sum(-1), rtol=1e-5,
                               atol=1e-6 * np.abs(want.sum(-1)).max())
    for qi, row in enumerate(doc["queries"]):
        assert [t["train_id"] for t in row["top"]] == TRAIN[np.argsort(-want[qi].sum(-1), kind="stable")[:5]].tolist()
    # learn-weights with the label-free c: the grid's SNR-best in numpy, and weights that lower the objective there
    path, wdoc = learn_weights_run(LearnWeightsSpec(out=str(root / "w.json"), ids=LEARN, steps=60, **common),
                                   progress=False)
    prov = wdoc["provenance"]
    table = [[c, snr(diagonal_influence(gl, gt, spans, c), np.full(len(names), 1 / len(names)))]
             for c in (1e-4, 1e-2, 1.0)]
    np.testing.assert_allclose(prov["lambda_grid"], table, rtol=1e-6)
    assert prov["lambda_c"] == min(table, key=lambda r: (r[1], r[0]))[0]
    w = np.array([wdoc["weights"][n] for n in names])
    learn = diagonal_influence(gl, gt, spans, prov["lambda_c"])
    assert snr(learn, w) < snr(learn, np.full(len(names), 1 / len(names))) - 1e-3
    # the weighted attribution through the CLI (a registered method is a --method choice), the weights' own c
    assert main(["attribute", "--method", NAME, "--checkpoint", run, "--ids", str(root / "held.txt"), "--data",
                 "digits", "--n", str(N_DATA), "--groups", "tensor", "--timesteps", "1", "--weights", str(path),
                 "--top-k", "5", "--out", str(root / "learned"), *QUIET]) == 0
    learned = json.loads((root / "learned" / "attributions.json").read_text())
    assert learned["manifest"]["lambda"]["c"] == prov["lambda_c"] and learned["manifest"]["lambda"]["rule"] == \
        "weights file"
    scores = diagonal_influence(gq, gt, spans, prov["lambda_c"]) @ w
    np.testing.assert_allclose(np.load(root / "learned" / "scores.npy"), scores, rtol=1e-5,
                               atol=1e-6 * np.abs(scores).max())
    # the report takes it like any other attribute output
    assert main(["report", "--attributions", str(root / "uniform"), "--attributions", str(root / "learned"),
                 "--weights", str(path), "--out", str(root / "report.html"), *QUIET]) == 0
    assert "hidden.weight" in (root / "report.html").read_text()
    # weights are never applied to their own learning queries
    with pytest.raises(UserError, match="learning queries"):
        attribute_run(AttributeSpec(out=str(root / "bad"), ids=LEARN, weights=str(path), **common), progress=False)


def test_toy_method_refused_where_feature_stores_are_needed(toy, capsys):
    root, run = toy
    bad = [["attribute", "--method", NAME, "--train", str(root), "--queries", str(root), "--out", str(root / "x")],
           ["attribute", "--method", NAME, "--out", str(root / "x")],
           ["eval", "lds", "--run", run, "--retrain", str(root), "--method", NAME, "--train-features", str(root),
            "--queries", str(root), "--out", str(root / "x")]]
    for argv in bad:
        assert main([*argv, *QUIET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "drop --train" in err[0] and "--checkpoint" in err[1] and "--attributions" in err[2]
    assert not (root / "x").exists()


def diagonal_kernel(phi, q, slices, c) -> np.ndarray:
    """(Q, N, M): q_j diag(Φ_jᵀΦ_j + c · mean diag)⁻¹ φ_j, block by block in float64."""
    out = []
    for _, s, e in slices:
        d = (phi[:, s:e] ** 2).sum(0)
        out.append((q[:, s:e] / (d + c * d.mean())) @ phi[:, s:e].T)
    return np.stack(out, axis=-1)


def test_toy_kernel_on_features_attribute_and_learn_weights(toy):
    root, run = toy
    common = dict(checkpoint=run, groups="tensor", projection="identity", timesteps=1)
    ft, fq, fl = (featurize_run(FeaturizeSpec(out=str(root / f"f{name}"), **common, **extra), progress=False)
                  for name, extra in (("t", {}), ("q", dict(data="digits", n=N_DATA, ids=HELD)),
                                      ("l", dict(data="digits", n=N_DATA, ids=LEARN))))
    phi, q, ql = (np.asarray(s.features, dtype=np.float64) for s in (ft, fq, fl))
    slices = ft.group_slices
    doc = attribute_run(AttributeSpec(method=KERNEL_NAME, train=str(ft.path), queries=str(fq.path), lambda_c="0.05",
                                      top_k=5, report=False, out=str(root / "k-uniform")), progress=False)
    want = diagonal_kernel(phi, q, slices, 0.05)
    np.testing.assert_allclose(np.load(root / "k-uniform" / "scores.npy"), want.sum(-1), rtol=1e-4,
                               atol=1e-5 * np.abs(want.sum(-1)).max())
    assert doc["manifest"]["method"]["kernel"] == "diagonal"
    for qi, row in enumerate(doc["queries"]):
        parts = np.array([list(t["contributions"].values()) for t in row["top"]])
        np.testing.assert_allclose(parts, want[qi, np.searchsorted(TRAIN, [t["train_id"] for t in row["top"]])],
                                   rtol=1e-4, atol=1e-5 * np.abs(want).max())
    path, wdoc = learn_weights_run(LearnWeightsSpec(method=KERNEL_NAME, train=str(ft.path), queries=str(fl.path),
                                                    steps=60, out=str(root / "k-w.json")), progress=False)
    prov = wdoc["provenance"]
    m = len(slices)
    grid = np.logspace(-4, 0, 9)
    table = [[c, snr(diagonal_kernel(phi, ql, slices, c), np.ones(m))] for c in grid]
    np.testing.assert_allclose(prov["lambda_grid"], table, rtol=1e-4)
    assert prov["lambda_c"] == min(prov["lambda_grid"], key=lambda r: (r[1], r[0]))[0]
    assert (prov["method"], prov["kernel"]) == (KERNEL_NAME, "diagonal")
    w = np.array([wdoc["weights"][name] for name, _, _ in slices])
    learn = diagonal_kernel(phi, ql, slices, prov["lambda_c"])
    assert snr(learn, w) < snr(learn, np.ones(m)) - 1e-3
    attribute_run(AttributeSpec(method=KERNEL_NAME, train=str(ft.path), queries=str(fq.path), weights=str(path),
                                top_k=5, report=False, out=str(root / "k-learned")), progress=False)
    scores = diagonal_kernel(phi, q, slices, prov["lambda_c"]) @ w
    np.testing.assert_allclose(np.load(root / "k-learned" / "scores.npy"), scores, rtol=1e-4,
                               atol=1e-5 * np.abs(scores).max())
