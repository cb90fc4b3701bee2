"""EK-FAC through the CLI on a tiny digits ResNet: attribute-ekfac (uniform), learn-weights-ekfac on held-out
learning images, attribute-ekfac with the learned weights, and the report — each output against its own arrays
and a numpy computation (scores = Σ_j w_j c_j, top-k = argsort, the learned weights lower the label-free objective
computed in numpy); bad inputs end with one line and exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits

from gradtrace.adapters import get_adapter
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.errors import UserError
from gradtrace.pipeline.ekfac import EkfacInputs, self_influence, setup
from gradtrace.pipeline.model_scoring import spec_examples

pytestmark = pytest.mark.usefixtures("one_thread")

N_DATA, TRAIN, HELD, LEARN = 180, np.arange(0, 140), np.arange(140, 160), np.arange(160, 180)
QUIET = ["--no-progress"]


def ids_file(path, ids) -> str:
    path.write_text("\n".join(str(int(i)) for i in ids) + "\n")
    return str(path)


def snr(contrib, w, k=10) -> float:
    tau = (contrib * w).sum(-1)
    top = -np.sort(-tau, axis=1)[:, :k]
    return float(np.mean(-top.mean(1) / np.linalg.norm(tau, axis=1)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ekfac")
    assert main(["train", "--adapter", "classifier", "--model", "resnet", "--data", "digits", "--n", str(N_DATA),
                 "--ids", ids_file(root / "train.txt", TRAIN), "--steps", "25", "--batch-size", "32", "--lr", "0.03",
                 "--model-options", '{"widths": [4, 8], "blocks": [1, 1]}', "--out", str(root / "run"), *QUIET]) == 0
    ids_file(root / "held.txt", HELD)
    ids_file(root / "learn.txt", LEARN)
    return root


def test_attribute_learn_and_weighted_attribute(run):
    common = ["--checkpoint", str(run / "run"), "--data", "digits", "--n", str(N_DATA), "--factors",
              str(run / "factors"), *QUIET]
    assert main(["learn-weights-ekfac", *common, "--ids", str(run / "learn.txt"), "--steps", "60",
                 "--out", str(run / "w.json")]) == 0
    wdoc = json.loads((run / "w.json").read_text())
    c = wdoc["provenance"]["lambda_c"]
    assert c in [row[0] for row in wdoc["provenance"]["lambda_grid"]]
    names = wdoc["group_names"]
    assert names == ["stem", "layer1.0", "layer2.0", "head"]
    w = np.array([wdoc["weights"][n] for n in names])
    # uniform attributions at the weights' c, of the evaluation and of the learning images (same factors)
    for name, ids in (("uniform", "held.txt"), ("learn", "learn.txt")):
        assert main(["attribute-ekfac", *common, "--ids", str(run / ids), "--lambda-c", str(c), "--top-k", "5",
                     "--out", str(run / name)]) == 0
    learn = np.load(run / "learn" / "contributions.npy").astype(np.float64)
    assert snr(learn, w) == pytest.approx(wdoc["learning"]["final_loss"], rel=1e-4)
    assert snr(learn, w) < snr(learn, np.full(4, 0.25)) - 1e-3
    contrib = np.load(run / "uniform" / "contributions.npy").astype(np.float64)
    assert contrib.shape == (len(HELD), len(TRAIN), 4)
    uniform = np.load(run / "uniform" / "scores.npy")  # no weights: all ones, the sum of the groups
    np.testing.assert_allclose(uniform, contrib.sum(-1), rtol=1e-5, atol=1e-6 * np.abs(uniform).max())
    np.testing.assert_array_equal(np.load(run / "uniform" / "query_ids.npy"), HELD)
    np.testing.assert_array_equal(np.load(run / "uniform" / "train_ids.npy"), TRAIN)
    # the learned weights (their c by default): scores = Σ_j w_j c_j, top-k by those scores, parts sum to them
    assert main(["attribute-ekfac", *common, "--ids", str(run / "held.txt"), "--weights", str(run / "w.json"),
                 "--top-k", "5", "--out", str(run / "learned")]) == 0
    doc = json.loads((run / "learned" / "attributions.json").read_text())
    assert doc["manifest"]["lambda"]["c"] == c and doc["manifest"]["method"]["method"] == "ekfac"
    scores = contrib @ w
    scale = np.abs(scores).max()
    np.testing.assert_allclose(np.load(run / "learned" / "scores.npy"), scores, rtol=1e-4, atol=1e-6 * scale)
    digits = load_digits().target  # each example named by its source, as the other methods' outputs are
    for qi, row in enumerate(doc["queries"]):
        assert row["query_id"] == HELD[qi] and row["source"] == {"caption": str(digits[HELD[qi]])}
        assert [t["source"] for t in row["top"]] == [{"caption": str(digits[t["train_id"]])} for t in row["top"]]
        assert [t["train_id"] for t in row["top"]] == TRAIN[np.argsort(-scores[qi], kind="stable")[:5]].tolist()
        for t in row["top"]:
            assert sum(t["contributions"].values()) == pytest.approx(t["score"], rel=1e-4, abs=1e-6 * scale)
    # the report takes EK-FAC output like any other attribute output
    assert main(["report", "--attributions", str(run / "uniform"), "--attributions", str(run / "learned"),
                 "--weights", str(run / "w.json"), "--out", str(run / "report.html"), *QUIET]) == 0
    assert "layer2.0" in (run / "report.html").read_text()
    # weights are never applied to their own learning queries
    assert main(["attribute-ekfac", *common, "--ids", str(run / "learn.txt"), "--weights", str(run / "w.json"),
                 "--out", str(run / "bad")]) == 2


def test_bad_inputs_give_one_line_and_exit_2(run, tmp_path, capsys):
    held = ["--ids", str(run / "held.txt"), *QUIET]
    assert main(["attribute-ekfac", "--checkpoint", str(run / "train.txt"), *held, "--out", str(tmp_path / "a")]) == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["attribute-ekfac", "--checkpoint", str(tmp_path / "foreign"), *held, "--out",
                 str(tmp_path / "b")]) == 2
    assert main(["train", "--adapter", "classifier", "--model", "factory", "--data", "digits", "--n", "60",
                 "--steps", "2", "--model-options", '{"factory": "fixtures.classifiers:no_layers", "kwargs": {}}',
                 "--out", str(tmp_path / "nolayers"), *QUIET]) == 0
    capsys.readouterr()
    assert main(["attribute-ekfac", "--checkpoint", str(tmp_path / "nolayers"), "--ids", str(run / "held.txt"),
                 "--data", "digits", "--n", str(N_DATA), "--out", str(tmp_path / "c"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no linear or convolution layer" in err
    assert main(["attribute-ekfac", "--checkpoint", str(run / "run"), *held, "--lambda-c", "auto",
                 "--out", str(tmp_path / "d")]) == 2
    assert main(["attribute-ekfac", "--checkpoint", str(run / "run"), *held, "--groups", "tensor",
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "learning-ids" in err[0] and "apart" in err[1]


def test_self_influence_per_group_is_the_diagonal_of_loss_attributions(run):
    got = self_influence(run / "run", factors=run / "factors", lambda_c=0.1, progress=False)
    assert got.group_names == ["stem", "layer1.0", "layer2.0", "head"]
    np.testing.assert_array_equal(got.ids, TRAIN)
    assert main(["attribute-ekfac", "--checkpoint", str(run / "run"), "--data", "digits", "--n", str(N_DATA),
                 "--factors", str(run / "factors"), "--ids", str(run / "train.txt"), "--measurement", "loss",
                 "--lambda-c", "0.1", "--out", str(run / "self"), *QUIET]) == 0
    pairwise = np.load(run / "self" / "contributions.npy").astype(np.float64)
    diag = np.einsum("nnm->nm", pairwise)
    np.testing.assert_allclose(got.contributions, diag, rtol=1e-4, atol=1e-6 * np.abs(diag).max())
    assert (got.contributions.sum(1) > 0).all()
    # given examples are fitted and scored instead of the recorded ones: the same examples give the same numbers,
    # labels flipped for the first five give other factors (refused in the same folder) and other scores
    adapter = get_adapter("classifier")
    source = {"kind": "dataset", "spec": "digits", "n": N_DATA, "size": None, "seed": 0}
    given = adapter.examples(adapter.load(run / "run").model_config, source, ids=TRAIN)
    same = self_influence(run / "run", examples=given, factors=run / "factors-given", progress=False)
    np.testing.assert_allclose(same.contributions, got.contributions, rtol=1e-6)
    given.cond = given.cond.copy()
    given.cond[:5] = (given.cond[:5] + 1) % 10
    with pytest.raises(UserError, match="fitted for another"):
        self_influence(run / "run", examples=given, factors=run / "factors-given", progress=False)
    mis = self_influence(run / "run", examples=given, factors=run / "factors-flipped", progress=False)
    assert not np.allclose(mis.contributions[:5], got.contributions[:5], rtol=1e-3)


def test_eval_lds_takes_the_ekfac_output(run):
    if not (run / "uniform" / "scores.npy").exists():
        assert main(["attribute-ekfac", "--checkpoint", str(run / "run"), "--data", "digits", "--n", str(N_DATA),
                     "--factors", str(run / "factors"), "--ids", str(run / "held.txt"), "--lambda-c", "0.1",
                     "--out", str(run / "uniform"), *QUIET]) == 0
    assert main(["retrain", "--run", str(run / "run"), "--subsets", "4", *QUIET]) == 0
    retrain = run / "run" / "retrain"
    assert main(["eval", "lds", "--run", str(run / "run"), "--retrain", str(retrain), "--attributions",
                 str(run / "uniform"), "--per-group", "--out", str(run / "lds"), *QUIET]) == 0
    lds = json.loads((run / "lds" / "lds.json").read_text())
    # independently: each retrained model's margin on the held-out images by a direct forward pass
    ds = load_dataset("digits", n=N_DATA).subset(HELD)
    labels = np.array([int(m["label"]) for m in ds.metadata])
    margins = []
    for job in json.loads((retrain / "manifest.json").read_text())["settings"]["jobs"]:
        model = get_adapter("classifier").load(retrain / "models" / job).model
        with torch.no_grad():
            p = torch.softmax(model(ds.images).double(), 1).numpy()[np.arange(len(HELD)), labels]
        margins.append(np.log(p / (1 - p)))
    margins = np.array(margins)
    mask = np.stack([np.isin(TRAIN, s) for s in np.load(retrain / "subsets.npy")]).astype(np.float64)
    contrib = np.load(run / "uniform" / "contributions.npy").astype(np.float64)
    want = [spearmanr(p, t).statistic for p, t in zip((mask @ contrib.sum(-1).T).T, margins.T)]
    np.testing.assert_allclose([np.nan if v is None else v for v in lds["lds"]["per_query"]], want, rtol=1e-5,
                               atol=1e-7)
    head = [spearmanr(p, t).statistic for p, t in zip((mask @ contrib[..., 3].T).T, margins.T)]
    assert lds["per_group"]["head"]["mean"] == pytest.approx(np.nanmean(head), rel=1e-5)
    assert lds["manifest"]["method"]["method"] == "ekfac"
    assert main(["eval", "lds", "--run", str(run / "run"), "--retrain", str(retrain), "--attributions",
                 str(run / "uniform"), "--weights", str(run / "w.json"), "--out", str(run / "lds2"), *QUIET]) == 2


def test_eval_counterfactual_takes_the_ekfac_output(run):
    """The removed top-k are the k highest scores of the written scores.npy (one query, two models + the full)."""
    if not (run / "uniform" / "scores.npy").exists():
        assert main(["attribute-ekfac", "--checkpoint", str(run / "run"), "--data", "digits", "--n", str(N_DATA),
                     "--factors", str(run / "factors"), "--ids", str(run / "held.txt"), "--lambda-c", "0.1",
                     "--out", str(run / "uniform"), *QUIET]) == 0
    assert main(["eval", "counterfactual", "--run", str(run / "run"), "--attributions", str(run / "uniform"),
                 "--num-queries", "1", "--top-k", "7", "--out", str(run / "cf"), *QUIET]) == 0
    doc = json.loads((run / "cf" / "counterfactual.json").read_text())
    scores = np.load(run / "uniform" / "scores.npy")
    assert doc["per_query"][0]["query_id"] == HELD[0]
    assert doc["per_query"][0]["removed_top"] == sorted(TRAIN[np.argsort(-scores[0], kind="stable")[:7]].tolist())
    assert doc["manifest"]["method"]["method"] == "ekfac"


def test_tiny_diffusion_unet_contributions_sum_to_kronfluence_total(tmp_path):
    """The tiny diffusion UNet, its loss over 2 timesteps (two rows per example): per-group contributions of
    held-out digits sum to kronfluence's own total, and the loss measurement keeps kronfluence's sign."""
    assert main(["train", "--data", "digits", "--n", "30", "--ids", ids_file(tmp_path / "t.txt", range(24)),
                 "--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "unet"), *QUIET]) == 0
    spec = EkfacInputs(checkpoint=str(tmp_path / "unet"), ids=ids_file(tmp_path / "q.txt", range(24, 27)),
                       timesteps=2, batch_size=8, factors=str(tmp_path / "f"), device="cpu")
    s = setup(spec, tmp_path / "f", progress=False).fit()
    queries = spec_examples(s, spec, spec.ids)
    assert s.engine.sign == 1.0 and s.engine.fisher == "empirical"  # a loss; no predictive distribution
    contrib = s.engine.contributions(queries, s.train, 0.1)
    total = s.engine.total(queries, s.train, 0.1)
    assert contrib.shape == (3, 24, len(s.engine.group_names)) and len(s.engine.group_names) > 5
    np.testing.assert_allclose(contrib.sum(-1), total, rtol=1e-4, atol=1e-5 * np.abs(total).max())


def test_attribute_and_learn_weights_method_ekfac_give_the_alias_outputs(run):
    """`attribute --method ekfac` / `learn-weights --method ekfac` (the general commands) write exactly the arrays
    and weights of `attribute-ekfac` / `learn-weights-ekfac` (uniform with c auto on learning ids, and weighted)."""
    common = ["--checkpoint", str(run / "run"), "--data", "digits", "--n", str(N_DATA), "--factors",
              str(run / "factors"), *QUIET]
    learn = ["--ids", str(run / "learn.txt"), "--steps", "30"]
    assert main(["learn-weights-ekfac", *common, *learn, "--out", str(run / "alias-w.json")]) == 0
    assert main(["learn-weights", "--method", "ekfac", *common, *learn, "--out", str(run / "new-w.json")]) == 0
    old, new = (json.loads((run / f"{n}-w.json").read_text()) for n in ("alias", "new"))
    assert new["weights"] == old["weights"] and new["provenance"]["lambda_grid"] == old["provenance"]["lambda_grid"]
    for name, extra in (("auto", ["--lambda-c", "auto", "--learning-ids", str(run / "learn.txt")]),
                        ("weighted", ["--weights", str(run / "alias-w.json")])):
        args = [*common, "--ids", str(run / "held.txt"), "--top-k", "5", *extra]
        assert main(["attribute-ekfac", *args, "--out", str(run / f"alias-{name}")]) == 0
        assert main(["attribute", "--method", "ekfac", *args, "--out", str(run / f"new-{name}")]) == 0
        for array in ("scores", "contributions", "topk_ids", "topk_scores", "topk_contributions", "train_ids",
                      "query_ids"):
            a, b = (np.load(run / f"{kind}-{name}" / f"{array}.npy") for kind in ("alias", "new"))
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, array)
        docs = [json.loads((run / f"{kind}-{name}" / "attributions.json").read_text()) for kind in ("alias", "new")]
        assert docs[0]["queries"] == docs[1]["queries"]
        assert docs[0]["manifest"]["lambda"] == docs[1]["manifest"]["lambda"]
    # the general command refuses what the method cannot take, in one line
    assert main(["attribute", "--method", "ekfac", *common, "--ids", str(run / "held.txt"), "--aspect", "style",
                 "--out", str(run / "bad")]) == 2
