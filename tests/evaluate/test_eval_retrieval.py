"""`gradtrace eval retrieval`: Recall@k / mAP per label column from attribution runs, checked against a plain
loop over the saved scores and the examples' metadata, scikit-learn's AP, and a bootstrap written out by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from gradtrace.cli import main
from gradtrace.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = ["--dim", "32", "--timesteps", "1", "--chunk", "16", "--no-progress"]
ASPECTS = ("subject", "style", "background")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    assert main(["train", "--data", "shapes", "--n", "48", "--steps", "3", "--batch-size", "16",
                 "--out", str(root / "run"), "--no-progress"]) == 0
    assert main(["featurize", "--checkpoint", str(root / "run"), "--out", str(root / "ft"), *FEAT]) == 0
    # queries: new real shapes (another data seed), labelled by their metadata
    assert main(["featurize", "--checkpoint", str(root / "run"), "--data", "shapes", "--data-seed", "1", "--n", "9",
                 "--out", str(root / "fq"), *FEAT]) == 0
    for name, c in (("a", "0.1"), ("b", "10")):
        assert main(["attribute", "--train", str(root / "ft"), "--queries", str(root / "fq"), "--top-k", "6",
                     "--lambda-c", c, "--out", str(root / name), "--no-progress"]) == 0
    return root


def _recall(scores, rel, k):
    out = []
    for s, r in zip(scores, rel):
        if not r.any():
            out.append(np.nan)
            continue
        order = sorted(range(len(s)), key=lambda n: (-s[n], n))
        out.append(sum(r[n] for n in order[:k]) / min(k, r.sum()))
    return np.array(out)


def _boot(values, n, seed):
    v = values[np.isfinite(values)]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n, len(v)))
    means = np.array([v[row].mean() for row in idx])
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def test_numbers_equal_a_hand_computation(runs, tmp_path):
    out = tmp_path / "ret"
    assert main(["eval", "retrieval", "--attributions", str(runs / "a"), "--attributions", str(runs / "b"),
                 "--labels", "subject,style,background", "--k", "3,5", "--bootstrap", "300", "--seed", "4",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "retrieval.json").read_text())
    train_meta = load_dataset("shapes", n=48).metadata
    query_meta = load_dataset("shapes", n=9, seed=1).metadata
    per_q = {}
    for run, name in zip(doc["runs"], ("a", "b")):
        scores = np.load(runs / name / "scores.npy").astype(np.float64)
        for aspect in ASPECTS:
            rel = np.array([[t[aspect] == q[aspect] for t in train_meta] for q in query_meta])
            for k in (3, 5):
                want = _recall(scores, rel, k)
                got = run["metrics"][aspect][f"recall@{k}"]
                np.testing.assert_allclose(got["per_query"], want, rtol=1e-12)
                assert got["mean"] == pytest.approx(want.mean())
                assert got["ci95"] == pytest.approx(_boot(want, 300, 4))
            ap = np.array([average_precision_score(r, s) for r, s in zip(rel, scores)])
            np.testing.assert_allclose(run["metrics"][aspect]["map"]["per_query"], ap, rtol=1e-9)
            per_q[(name, aspect)] = ap
    diffs = {(d["aspect"], d["metric"]): d for d in doc["differences"]}
    assert len(diffs) == 3 * 3 and all(d["a"] != d["b"] for d in doc["differences"])
    for aspect in ASPECTS:
        d = diffs[(aspect, "map")]
        delta = per_q[("b", aspect)] - per_q[("a", aspect)]
        assert d["mean"] == pytest.approx(delta.mean())
        assert d["ci95"] == pytest.approx(_boot(delta, 300, 4))
        lo, hi = d["ci95"]
        assert d["verdict"] == ("higher" if lo > 0 else "lower" if hi < 0 else "no clear difference")
    assert doc["manifest"]["labels"] == list(ASPECTS) and doc["manifest"]["k"] == [3, 5]
    assert "| subject |" in (out / "retrieval.md").read_text()
    # run again into the same folder (the runs swapped): the result is replaced, not refused
    assert main(["eval", "retrieval", "--attributions", str(runs / "b"), "--attributions", str(runs / "a"),
                 "--labels", "subject,style,background", "--k", "3,5", "--bootstrap", "300", "--seed", "4",
                 "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "retrieval.json").read_text())
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in reversed(doc["runs"])]


def test_labels_from_a_file_and_top_k_only(runs, tmp_path):
    # queries relabelled by a file (every query "circle" except query 0 left without a value); without
    # scores.npy the recall comes from the top-k ids alone and equals the one from the scores
    (tmp_path / "q.csv").write_text("id,subject\n" + "".join(f"{i},{'' if i == 0 else 'circle'}\n" for i in range(9)))
    full = tmp_path / "full"
    assert main(["eval", "retrieval", "--attributions", str(runs / "a"), "--labels", "subject", "--k", "6",
                 "--query-labels", str(tmp_path / "q.csv"), "--out", str(full), "--no-progress"]) == 0
    doc = json.loads((full / "retrieval.json").read_text())
    vals = doc["runs"][0]["metrics"]["subject"]["recall@6"]["per_query"]
    scores = np.load(runs / "a" / "scores.npy")
    rel = np.array([[t["subject"] == "circle" for t in load_dataset("shapes", n=48).metadata]] * 9)
    want = _recall(scores, rel, 6)
    assert vals[0] is None and doc["runs"][0]["metrics"]["subject"]["recall@6"]["n_undefined"] == 1
    np.testing.assert_allclose(vals[1:], want[1:])
    topk_only = tmp_path / "topk"
    import shutil
    shutil.copytree(runs / "a", topk_only)
    (topk_only / "scores.npy").unlink()
    assert main(["eval", "retrieval", "--attributions", str(topk_only), "--labels", "subject", "--k", "6",
                 "--query-labels", str(tmp_path / "q.csv"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    doc2 = json.loads((tmp_path / "o2" / "retrieval.json").read_text())
    assert doc2["runs"][0]["metrics"]["subject"]["recall@6"]["per_query"] == vals
    assert "map" not in doc2["runs"][0]["metrics"]["subject"]


@pytest.mark.parametrize("args, message", [
    (["--labels", "colour"], "no metadata column 'colour'"),
    (["--labels", "subject", "--k", "0"], "--k must be positive"),
    (["--labels", "subject", "--k", "49"], "--k 49 must be in 1..48"),
    (["--labels", "subject,subject"], "names a column twice"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["eval", "retrieval", "--attributions", str(runs / "a"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_report_shows_the_retrieval_section(runs, tmp_path):
    out = tmp_path / "ret"
    assert main(["eval", "retrieval", "--attributions", str(runs / "a"), "--labels", "style", "--out", str(out),
                 "--no-progress"]) == 0
    doc = json.loads((out / "retrieval.json").read_text())
    assert main(["report", "--attributions", str(runs / "a"), "--retrieval", str(out),
                 "--out", str(tmp_path / "r.html"), "--no-progress"]) == 0
    page = (tmp_path / "r.html").read_text()
    m = doc["runs"][0]["metrics"]["style"]["recall@10"]
    assert 'id="retrieval"' in page and f"{m['mean']:.4f} [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]" in page
