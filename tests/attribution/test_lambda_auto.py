"""attribute --lambda-c auto: λ chosen by the SNR rule on the learning queries only, never the attributed ones."""
import json

import numpy as np
import pytest

from gradtrace.cli import main
from gradtrace.features.store import FeatureStore
from gradtrace.methods import get_method
from gradtrace.weights import choose_lambda_scale


def _store_like(template: FeatureStore, path, features, ids):
    """A complete query store with the template's settings and the given features (e.g. crafted queries)."""
    store = FeatureStore.create(path, template.settings, ids, provenance={"made_by": "test"})
    store.write(0, np.asarray(features, dtype=np.float32))
    store.finish()
    return path


@pytest.mark.parametrize("kernel", ["shared", "per-group"])
def test_lambda_auto_reads_only_the_learning_queries(pipeline, tmp_path, kernel):
    train, learn = FeatureStore.open(pipeline / "ft"), FeatureStore.open(pipeline / "fq")
    phi = np.asarray(train.features)
    crafted = phi[:3]  # copies of training rows: queries whose own SNR-best c differs from the learning queries'
    evaluation = _store_like(learn, tmp_path / "eval", crafted, [10_000, 10_001, 10_002])
    c_learn, _ = choose_lambda_scale(phi, train.group_slices, np.asarray(learn.features), kernel=kernel, k=10)
    c_eval, _ = choose_lambda_scale(phi, train.group_slices, crafted, kernel=kernel, k=10)
    assert c_learn != c_eval  # so reading the evaluation queries would change the choice

    def run(queries, learning, out):
        assert main(["attribute", "--train", str(pipeline / "ft"), "--queries", str(queries), "--kernel", kernel,
                     "--lambda-c", "auto", "--learning-queries", str(learning), "--top-k", "4",
                     "--out", str(out), "--no-progress", "--no-report"]) == 0
        return json.loads((out / "attributions.json").read_text())["manifest"]

    man = run(evaluation, pipeline / "fq", tmp_path / "a")
    assert man["method"]["c"] == c_learn and man["lambda"]["c"] == c_learn
    assert man["lambda"]["learning_queries"]["store"] == str(pipeline / "fq")
    grid = np.array(man["lambda"]["grid"])
    assert grid[np.argmin(grid[:, 1]), 0] == c_learn
    # the scores are those of the kernel with the learning queries' c
    ref = get_method("trak", c=c_learn, kernel=kernel).fit(phi, train.group_slices).scores(crafted)
    np.testing.assert_allclose(np.load(tmp_path / "a" / "topk_scores.npy"), -np.sort(-ref, axis=1)[:, :4],
                               rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # swapping the roles swaps the choice: the rule reads the store it is given as learning queries
    assert run(pipeline / "fq", evaluation, tmp_path / "b")["method"]["c"] == c_eval


def _error(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and pattern in err, err


def test_lambda_auto_refusals(pipeline, tmp_path, capsys):
    out = tmp_path / "a"
    args = ["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--out", str(out),
            "--no-report", "--no-progress"]
    _error(capsys, [*args, "--lambda-c", "auto"], "pass --learning-queries")
    _error(capsys, [*args, "--lambda-c", "auto", "--learning-queries", str(pipeline / "fq")], "same queries")
    _error(capsys, [*args, "--lambda-c", "0.1", "--learning-queries", str(pipeline / "ft")], "only used with")
    _error(capsys, [*args, "--lambda-c", "auto", "--learning-queries", str(pipeline / "ft"), "--method", "tracin"],
           "tracin has none")
    _error(capsys, [*args, "--lambda-c", "big"], "must be a number or 'auto'")
    assert not out.exists()  # nothing written by a refused command
