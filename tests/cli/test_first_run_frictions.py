"""What a new user tripped on, each checked: one default guidance for evaluation and learning queries, recorded in
the weights file and checked when scoring; a warning when the label-free λ lands on the grid's edge; the fair
uniform-vs-learned comparison in one command (uniform weights at the learned weights' c, against a closed form)."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from gradtrace.attribution.lambda_rule import grid_edge
from gradtrace.cli import main
from gradtrace.features.store import FeatureStore
from gradtrace.pipeline.spec import default_of
from gradtrace.pipeline.specs.learn_weights import LearnWeightsSpec
from gradtrace.pipeline.specs.sample import SampleSpec
from gradtrace.weights import choose_lambda_scale

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = ["--dim", "96", "--timesteps", "2", "--chunk", "16", "--no-progress"]


def _default(spec, name):
    return default_of(next(f for f in fields(spec) if f.name == name))


def _run(capsys, argv) -> list[str]:
    """Run a command that must succeed; its stderr lines."""
    assert main([*argv, "--no-progress"]) == 0
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def learned(pipeline):
    """Weights learned on generated learning queries with the default guidance, at a fixed c, shared kernel."""
    out = pipeline / "frictions" / "w.json"
    assert main(["learn-weights", "--train", str(pipeline / "ft"), "--generate", "4", "--sample-steps", "3",
                 "--lambda-c", "0.05", "--kernel", "shared", "--k", "3", "--steps", "10", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_one_default_guidance_recorded_and_checked(pipeline, learned, tmp_path, capsys):
    assert _default(SampleSpec, "guidance") == _default(LearnWeightsSpec, "guidance")
    doc = json.loads(learned.read_text())
    sampling = doc["provenance"]["learning_queries"]["sampling"]
    made = json.loads((Path(doc["provenance"]["learning_queries"]["set"]) / "samples" / "manifest.json").read_text())
    assert sampling["guidance"] == made["guidance"] == _default(SampleSpec, "guidance")

    args = ["attribute", "--train", str(pipeline / "ft"), "--weights", str(learned), "--kernel", "shared",
            "--top-k", "3", "--no-report"]
    # queries sampled with the same (default) guidance: no warning
    assert _run(capsys, [*args, "--queries", str(pipeline / "fq"), "--out", str(tmp_path / "same")]) == []
    # queries sampled with another guidance: one line naming both values and the fix
    _run(capsys, ["sample", "--checkpoint", str(pipeline / "run"), "--num", "2", "--sample-steps", "3",
                  "--guidance", "3", "--out", str(tmp_path / "q3")])
    _run(capsys, ["featurize", "--checkpoint", str(pipeline / "run"), "--samples", str(tmp_path / "q3"),
                  "--out", str(tmp_path / "fq3"), *FEAT])
    err = _run(capsys, [*args, "--queries", str(tmp_path / "fq3"), "--out", str(tmp_path / "other")])
    assert len(err) == 1 and err[0].startswith("gradtrace attribute: warning:"), err
    assert "guidance 1" in err[0] and "with 3" in err[0] and "--guidance 3" in err[0]


def _store_of(template: FeatureStore, path, rows: np.ndarray):
    store = FeatureStore.create(path, template.settings, 30_000 + np.arange(len(rows)), provenance={"made_by": "test"})
    store.write(0, rows.astype(np.float32))
    store.finish()
    return path


def test_lambda_on_the_grid_edge_warns(pipeline, tmp_path, capsys):
    train, queries = FeatureStore.open(pipeline / "ft"), FeatureStore.open(pipeline / "fq")
    phi = np.asarray(train.features)
    # learning queries that are the mean training feature: the SNR keeps improving with damping (c on the grid's
    # top); copies of training rows: an SNR-best c inside the grid
    mean = _store_of(queries, tmp_path / "mean", np.repeat(phi.mean(0, keepdims=True), 3, axis=0))
    copies = _store_of(queries, tmp_path / "copies", phi[:3])
    for learning, name in ((mean, "edge"), (copies, "inner")):
        c, table = choose_lambda_scale(phi, train.group_slices, np.asarray(FeatureStore.open(learning).features),
                                       kernel="per-group", k=3)
        values = [float(row[0]) for row in table]
        at_edge = c in (min(values), max(values))
        assert at_edge == (name == "edge")  # the two cases are what they are meant to be
        assert grid_edge(float(c), table) == ("highest" if name == "edge" else None)  # a cliff, not a plateau
        err = _run(capsys, ["learn-weights", "--train", str(pipeline / "ft"), "--queries", str(learning),
                            "--lambda-c", "auto", "--k", "3", "--steps", "5", "--out", str(tmp_path / f"{name}.json")])
        prov = json.loads((tmp_path / f"{name}.json").read_text())["provenance"]
        assert prov["lambda_c"] == pytest.approx(c)
        warned = [line for line in err if "warning" in line and "grid" in line]
        assert len(warned) == (1 if at_edge else 0) and len(err) == len(warned), err
        if at_edge:
            assert warned[0].startswith("gradtrace learn-weights: warning: the label-free λ scale c = 1e+00 is the "
                                        "highest value of the grid 1e-04..1e+00"), warned


@pytest.mark.parametrize("losses, c, edge", [
    ([-0.20, -0.21, -0.22], 1.0, "highest"),         # still improving at the top: warn
    ([-0.2334, -0.23339, -0.20], 1e-4, None),        # flat at the bottom (within 1e-3 relative): a plateau
    ([-0.2334, -0.2300, -0.20], 1e-4, "lowest"),     # improving at the bottom by 1.5%: warn
    ([-0.20, -0.22, -0.21], 1e-2, None),              # inside the grid
])
def test_grid_edge_tells_a_cliff_from_a_plateau(losses, c, edge):
    table = [[1e-4, losses[0]], [1e-2, losses[1]], [1.0, losses[2]]]
    assert grid_edge(c, table) == edge
    assert grid_edge(c, table[::-1]) == edge  # the table's order does not matter


def test_compare_uniform_scores_uniform_weights_at_the_weights_c(pipeline, learned, tmp_path, capsys):
    out = tmp_path / "attr"
    _run(capsys, ["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--top-k", "4",
                  "--weights", str(learned), "--compare-uniform", "--kernel", "shared", "--no-report",
                  "--out", str(out)])
    c = json.loads(learned.read_text())["provenance"]["lambda_c"]
    assert c == 0.05
    learned_doc = json.loads((out / "attributions.json").read_text())
    uniform_doc = json.loads((out / "uniform" / "attributions.json").read_text())
    assert learned_doc["manifest"]["method"]["c"] == uniform_doc["manifest"]["method"]["c"] == c
    assert uniform_doc["manifest"]["weights"] is None
    phi = np.load(pipeline / "ft" / "features.npy").astype(np.float64)
    q = np.load(pipeline / "fq" / "features.npy").astype(np.float64)
    ids = np.load(pipeline / "ft" / "ids.npy")
    gram = phi.T @ phi
    scores = q @ np.linalg.inv(gram + c * np.mean(np.diag(gram)) * np.eye(len(gram))) @ phi.T  # uniform, this c
    for r, entry in enumerate(uniform_doc["queries"]):
        order = np.argsort(-scores[r], kind="stable")[:4]
        assert [t["train_id"] for t in entry["top"]] == ids[order].tolist()
        np.testing.assert_allclose([t["score"] for t in entry["top"]], scores[r, order], rtol=1e-3,
                                   atol=1e-6 * np.abs(scores).max())
    assert main(["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--compare-uniform",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "pass --weights FILE or --aspect NAME" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
