"""One rule each, the same for every stage: accepted weights files, valid λ scales, method facts."""
import json

import numpy as np
import pytest

from gradtrace.attribution import parse_c, read_group_weights
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods import configure, get_method


def test_lambda_c_rule():
    assert parse_c(None) is None and parse_c("AUTO") == "auto"
    assert parse_c("0") == 0.0 and parse_c(0.25) == 0.25
    for bad in ("-1", "nan", "inf", "big"):
        with pytest.raises(UserError, match="--lambda-c"):
            parse_c(bad)


def test_method_facts_are_properties():
    assert not get_method("tracin").uses_lambda and get_method("trak").uses_lambda
    assert get_method("dtrak").required_measurement == "dtrak" and get_method("trak").required_measurement is None
    assert configure("tracin", kernel="per-group").kernel_kind == "identity"
    assert configure("trak", kernel="shared").kernel_kind == "shared"
    assert configure("trak").kernel_kind == "per-group"
    with pytest.raises(UserError, match="featurize with --measurement dtrak"):
        get_method("dtrak").check_measurement("loss", "store")


def test_plain_weights_file_is_accepted_by_attribute_and_scores_as_given(pipeline, tmp_path, capsys):
    train, queries = FeatureStore.open(pipeline / "ft"), FeatureStore.open(pipeline / "fq")
    w = np.linspace(0.5, 2.0, len(train.group_names))
    (tmp_path / "w.json").write_text(json.dumps({"weights": dict(zip(train.group_names, w.tolist()))}))
    got, info = read_group_weights(train, queries, tmp_path / "w.json", method="trak", kernel="per-group")
    assert got.tolist() == pytest.approx(w.tolist()) and info["format"] == "plain"
    out = tmp_path / "attr"
    assert main(["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--top-k", "3",
                 "--lambda-c", "0", "--weights", str(tmp_path / "w.json"), "--out", str(out), "--no-report",
                 "--no-progress"]) == 0, capsys.readouterr().err
    fitted = get_method("trak", kernel="per-group", c=0.0).fit(train.features, train.group_slices)
    scores = fitted.scores(np.asarray(queries.features), weights=w)
    doc = json.loads((out / "attributions.json").read_text())
    for q, row in enumerate(doc["queries"]):
        top = np.argsort(-scores[q], kind="stable")[:3]
        assert [t["train_id"] for t in row["top"]] == train.ids[top].tolist()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weights": {train.group_names[0]: 1.0}}))
    assert main(["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--weights",
                 str(bad), "--out", str(tmp_path / "no"), "--no-report"]) == 2
    assert "do not name the feature groups" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
