"""Image classifiers end to end through the CLI on digits: train a tiny ResNet, featurize its training set and
held-out images, attribute, learn weights on other held-out images, retrain on subsets and evaluate the LDS —
each stage's numbers against an independent computation (autograd margin gradients, a numpy per-group TRAK,
the label-free objective in numpy, each retrained model's margin by a direct forward pass)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from gradtrace.adapters import get_adapter
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")

N_DATA, TRAIN, HELD, LEARN = 260, np.arange(0, 200), np.arange(200, 230), np.arange(230, 260)
C = 0.1
OPTIONS = '{"widths": [4, 8], "blocks": [1, 1]}'
QUIET = ["--no-progress"]


def ids_file(path, ids) -> str:
    path.write_text("\n".join(str(int(i)) for i in ids) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    data = ["--data", "digits", "--n", str(N_DATA)]
    assert main(["train", "--adapter", "classifier", "--model", "resnet", *data, "--ids",
                 ids_file(root / "train.txt", TRAIN), "--steps", "30", "--batch-size", "32", "--lr", "0.03",
                 "--model-options", OPTIONS, "--out", str(root / "run"), *QUIET]) == 0
    feat = ["--checkpoint", str(root / "run"), "--projection", "identity", *QUIET]
    assert main(["featurize", *feat, "--out", str(root / "ft")]) == 0  # the checkpoint's own training ids
    for name, ids in (("fq", HELD), ("fl", LEARN)):
        assert main(["featurize", *feat, *data, "--ids", ids_file(root / f"{name}.txt", ids),
                     "--out", str(root / name)]) == 0
    return root


def margin_gradients(checkpoint, ids) -> tuple[np.ndarray, list[str]]:
    """Each example's gradient of its margin log(p_y / (1 − p_y)), by backward per example, parameters in the
    model's order; and that order."""
    model = get_adapter("classifier").load(checkpoint).model
    ds = load_dataset("digits", n=N_DATA)
    rows = ds.index_of(np.asarray(ids))
    out = []
    for r in rows:
        model.zero_grad()
        log_p = torch.log_softmax(model(ds.images[r:r + 1])[0], 0)
        y = int(ds.metadata[r]["label"])
        (log_p[y] - torch.log1p(-log_p[y].exp())).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy())
    return np.stack(out), [n for n, _ in model.named_parameters()]


def store_matrix(store: FeatureStore, names: list[str], model) -> np.ndarray:
    """The store's features with columns put in the model's parameter order (the store orders them by group)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    cols, start = {}, 0
    for g in store.settings["groups"]:
        for p in g["params"]:
            cols[p] = np.asarray(store.features)[:, start:start + sizes[p]]
            start += sizes[p]
    return np.concatenate([cols[n] for n in names], axis=1).astype(np.float64)


def per_group_trak(phi, q, slices, c):
    out = []
    for _, s, e in slices:
        g = phi[:, s:e].T @ phi[:, s:e]
        k = np.linalg.inv(g + c * np.mean(np.diag(g)) * np.eye(e - s))
        out.append(q[:, s:e] @ k @ phi[:, s:e].T)
    return np.stack(out, axis=-1)  # (Q, N, M)


def snr(contrib, w, k=10) -> float:
    tau = (contrib * w).sum(-1)
    top = -np.sort(-tau, axis=1)[:, :k]
    return float(np.mean(-top.mean(1) / np.linalg.norm(tau, axis=1)))


def test_features_are_the_margin_gradients(run):
    model = get_adapter("classifier").load(run / "run").model
    for name, ids in (("ft", TRAIN), ("fq", HELD)):
        store = FeatureStore.open(run / name)
        assert store.ids.tolist() == ids.tolist()
        assert store.settings["measurement"]["name"] == "margin"  # the classifier's default measurement
        assert store.cond.tolist() == [int(m["label"]) for m in load_dataset("digits", n=N_DATA).subset(ids).metadata]
        assert store.group_names == ["stem", "layer1.0", "layer2.0", "head"]
        want, names = margin_gradients(run / "run", ids)
        got = store_matrix(store, names, model)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    assert FeatureStore.open(run / "ft").manifest["provenance"]["adapter"] == "classifier"


def test_attribute_learn_weights_and_lds_match_plain_computations(run, capsys):
    ft = FeatureStore.open(run / "ft")
    phi, q, ql = (np.asarray(FeatureStore.open(run / n).features, dtype=np.float64) for n in ("ft", "fq", "fl"))
    contrib = per_group_trak(phi, q, ft.group_slices, C)
    scores = contrib.sum(-1)
    # attribute: top-5 ids, scores and per-group contributions
    assert main(["attribute", "--train", str(run / "ft"), "--queries", str(run / "fq"), "--lambda-c", str(C),
                 "--top-k", "5", "--out", str(run / "attr"), *QUIET]) == 0
    doc = json.loads((run / "attr" / "attributions.json").read_text())
    for qi, row in enumerate(doc["queries"]):
        want = np.argsort(-scores[qi], kind="stable")[:5]
        assert [t["train_id"] for t in row["top"]] == TRAIN[want].tolist()
        for t, n in zip(row["top"], want):
            assert t["score"] == pytest.approx(scores[qi, n], rel=1e-3, abs=1e-6 * np.abs(scores).max())
            assert list(t["contributions"].values()) == pytest.approx(contrib[qi, n].tolist(), rel=1e-3,
                                                                      abs=1e-6 * np.abs(scores).max())
    # learn-weights on held-out learning images: the label-free objective, in numpy, beats uniform
    assert main(["learn-weights", "--train", str(run / "ft"), "--queries", str(run / "fl"), "--lambda-c", str(C),
                 "--steps", "60", "--out", str(run / "weights.json"), *QUIET]) == 0
    wdoc = json.loads((run / "weights.json").read_text())
    w = np.array([wdoc["weights"][n] for n in ft.group_names])
    learn = per_group_trak(phi, ql, ft.group_slices, C)
    assert snr(learn, w) < snr(learn, np.full(len(w), 1 / len(w))) - 1e-3
    # LDS: the target of each query is its margin under each retrained model, by a direct forward pass
    assert main(["retrain", "--run", str(run / "run"), "--subsets", "6", *QUIET]) == 0
    assert main(["eval", "lds", "--run", str(run / "run"), "--retrain", str(run / "run" / "retrain"),
                 "--train-features", str(run / "ft"), "--queries", str(run / "fq"), "--weights",
                 str(run / "weights.json"), "--out", str(run / "lds"), *QUIET]) == 0
    lds = json.loads((run / "lds" / "lds.json").read_text())
    manifest = json.loads((run / "run" / "retrain" / "manifest.json").read_text())
    subsets = np.load(run / "run" / "retrain" / "subsets.npy")
    ds = load_dataset("digits", n=N_DATA)
    held = ds.subset(HELD)
    labels = np.array([int(m["label"]) for m in held.metadata])
    margins = []
    for job in manifest["settings"]["jobs"]:
        model = get_adapter("classifier").load(run / "run" / "retrain" / "models" / job).model
        with torch.no_grad():
            p = torch.softmax(model(held.images).double(), 1).numpy()[np.arange(len(HELD)), labels]
        margins.append(np.log(p / (1 - p)))
    margins = np.array(margins)  # (S, Q)
    assert margins.std(0).min() > 0  # the subsets do change each query's margin
    weighted = (contrib * w).sum(-1)
    mask = np.stack([np.isin(TRAIN, s) for s in subsets]).astype(np.float64)
    predictions = mask @ weighted.T
    want = [spearmanr(predictions[:, j], margins[:, j]).statistic for j in range(len(HELD))]  # not negated
    got = [np.nan if v is None else v for v in lds["lds"]["per_query"]]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert lds["manifest"]["model_output"]["name"] == "margin"
    assert lds["lds"]["mean"] == pytest.approx(np.mean(want), rel=1e-9)
    assert lds["lds"]["mean"] > 0.1  # measured: 0.36 with uniform weights on 8 subsets
    capsys.readouterr()


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), mode="L").save(flat / f"{i}.png")
    train = ["train", "--adapter", "classifier", "--steps", "1", "--out", str(tmp_path / "x"), *QUIET]
    store = ["--train", str(run / "ft"), "--queries", str(run / "fq"), "--out", str(tmp_path / "a"), *QUIET]
    cases = [
        ([*train, "--data", "digits", "--model", "factory"], "needs the function that builds the model"),
        ([*train, "--data", f"imagefolder:{flat}"], "has no class labels"),
        ([*train, "--data", "digits", "--model-options", "{widths: 3}"], "--model-options is not valid JSON"),
        ([*train, "--data", "digits", "--model-options", '{"widths": [4], "depth": 2}'], "unknown resnet setting"),
        (["train", "--data", "digits", "--model-options", "{}", "--out", str(tmp_path / "y")],
         "--model-options sets a classifier's architecture"),
        (["featurize", "--checkpoint", str(run / "run"), "--samples", str(tmp_path), "--out", str(tmp_path / "f")],
         "not generated samples"),
        (["featurize", "--checkpoint", str(run / "run"), "--measurement", "dtrak", "--out", str(tmp_path / "g")],
         "unknown measurement 'dtrak' for classifier models"),
        (["attribute", "--method", "dtrak", *store], "needs features of measurement 'dtrak'"),
        (["learn-weights", "--train", str(run / "ft"), "--generate", "4", *QUIET], "do not generate queries"),
        (["sample", "--checkpoint", str(run / "run"), "--out", str(tmp_path / "s"), *QUIET], "do not generate"),
    ]
    for argv, needle in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (argv, err)
