"""learn-weights and attribute --weights through the CLI: weighted scores against a closed form, refusals."""
import json

import numpy as np
import pytest

import gradtrace.attribution.output as attribute_module
import gradtrace.methods.trak as trak_module
from gradtrace.cli import main


def _error(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and pattern in err, err


@pytest.fixture(scope="module")
def learned(pipeline):
    out = pipeline / "w" / "general.json"
    assert main(["learn-weights", "--train", str(pipeline / "ft"), "--generate", "4", "--sample-steps", "3",
                 "--lambda-c", "auto", "--kernel", "shared", "--k", "3", "--steps", "20", "--guard", "none",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_weights_file_and_weighted_attribution(pipeline, learned, tmp_path):
    doc = json.loads(learned.read_text())
    store = json.loads((pipeline / "ft" / "manifest.json").read_text())
    names = [g["name"] for g in store["settings"]["groups"]]
    w = np.array([doc["weights"][n] for n in names])
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    prov = doc["provenance"]
    grid = np.array(prov["lambda_grid"])  # the auto choice is the grid's lowest SNR loss
    assert prov["lambda_c"] == pytest.approx(grid[np.argmin(grid[:, 1]), 0])
    assert prov["loss_last"] <= prov["loss_first"] + 1e-12
    assert main(["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--top-k", "4",
                 "--kernel", "shared", "--weights", str(learned), "--out", str(tmp_path / "a"), "--no-progress",
                 "--no-report"]) == 0
    res = json.loads((tmp_path / "a" / "attributions.json").read_text())
    phi = np.load(pipeline / "ft" / "features.npy").astype(np.float64)
    q = np.load(pipeline / "fq" / "features.npy").astype(np.float64)
    ids = np.load(pipeline / "ft" / "ids.npy")
    scale = np.concatenate([np.full(g["stop"] - g["start"], w[j]) for j, g in enumerate(store["settings"]["groups"])])
    gram = phi.T @ phi
    kernel = np.linalg.inv(gram + prov["lambda_c"] * np.mean(np.diag(gram)) * np.eye(len(gram)))
    scores = (q * scale) @ kernel @ phi.T  # τ_w = (w ⊙ φ(q)) K φ(x)
    for r, entry in enumerate(res["queries"]):
        order = np.argsort(-scores[r], kind="stable")[:4]
        assert [t["train_id"] for t in entry["top"]] == ids[order].tolist()
        np.testing.assert_allclose([t["score"] for t in entry["top"]], scores[r, order], rtol=1e-3,
                                   atol=1e-6 * np.abs(scores).max())
        for t in entry["top"]:
            assert sum(t["contributions"].values()) == pytest.approx(t["score"], rel=1e-4, abs=1e-7)


def test_mismatched_weights_are_refused(pipeline, learned, tmp_path, capsys):
    doc = json.loads(learned.read_text())
    doc["weights"]["not_a_group"] = doc["weights"].pop(next(iter(doc["weights"])))
    bad = tmp_path / "other_groups.json"
    bad.write_text(json.dumps(doc))
    args = ["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--no-report",
            "--kernel", "shared", "--out", str(tmp_path / "a")]
    _error(capsys, [*args, "--weights", str(bad)], "other parameter groups")
    _error(capsys, [*args, "--weights", str(learned), "--method", "tracin"], "was learned for trak/shared")
    _error(capsys, [*args, "--aspect", "style"], "no weights for aspect 'style'")
    # the learning queries themselves cannot be the evaluation queries
    learning = json.loads(learned.read_text())["provenance"]["learning_queries"]["store"]
    _error(capsys, ["attribute", "--train", str(pipeline / "ft"), "--queries", learning, "--no-report",
                    "--kernel", "shared", "--weights", str(learned), "--out", str(tmp_path / "a")],
           "are the learning queries")


@pytest.mark.parametrize("kernel", ["shared", "per-group"])
def test_large_store_path_scores_query_side_with_the_same_result(pipeline, learned, tmp_path, monkeypatch, kernel):
    """Above PSI_IN_MEMORY, attribute applies K to the queries instead of building Ψ: same attributions."""
    monkeypatch.setattr(trak_module, "DUAL_MIN_WIDTH", 1 << 30)  # a large store: more rows than columns, no dual
    args = ["attribute", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--top-k", "5",
            "--kernel", kernel, "--no-progress", "--no-report"]
    if kernel == "shared":  # the weights were learned for the shared kernel
        args += ["--weights", str(learned)]
    assert main([*args, "--out", str(tmp_path / "psi")]) == 0
    monkeypatch.setattr(attribute_module, "PSI_IN_MEMORY", 0)
    assert main([*args, "--out", str(tmp_path / "qside")]) == 0
    ref = json.loads((tmp_path / "psi" / "attributions.json").read_text())
    got = json.loads((tmp_path / "qside" / "attributions.json").read_text())
    assert got["manifest"]["method"]["query_side"] is True and "query_side" not in ref["manifest"]["method"]
    top = max(abs(t["score"]) for r in ref["queries"] for t in r["top"])
    for a, b in zip(ref["queries"], got["queries"]):
        assert [t["train_id"] for t in a["top"]] == [t["train_id"] for t in b["top"]]
        for ta, tb in zip(a["top"], b["top"]):
            assert tb["score"] == pytest.approx(ta["score"], abs=1e-5 * top)
            for name, value in ta["contributions"].items():
                assert tb["contributions"][name] == pytest.approx(value, abs=1e-5 * top)


def test_guarded_weights_are_the_shrunk_learned_ones(pipeline, learned, tmp_path):
    out = tmp_path / "guarded.json"
    generated = json.loads(learned.read_text())["provenance"]["learning_queries"]["store"]
    assert main(["learn-weights", "--train", str(pipeline / "ft"), "--queries", generated,
                 "--lambda-c", "auto", "--kernel", "shared", "--k", "3", "--steps", "20", "--guard", "holdout",
                 "--out", str(out), "--no-progress"]) == 0
    doc, plain = json.loads(out.read_text()), json.loads(learned.read_text())
    guard = doc["provenance"]["guard"]
    assert doc["provenance"]["spec"]["guard"] == "holdout" and guard["shrink"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    names = list(plain["weights"])
    theta = np.log([plain["weights"][n] for n in names])  # softmax(θ) = w: θ up to a constant
    shrunk = np.exp(guard["shrink"] * (theta - theta.max()))
    np.testing.assert_allclose([doc["weights"][n] for n in names], shrunk / shrunk.sum(), rtol=1e-9, atol=1e-12)


def test_the_default_guard_is_the_holdout_guard_and_says_what_it_kept(pipeline, learned, tmp_path, capsys):
    out = tmp_path / "default.json"
    generated = json.loads(learned.read_text())["provenance"]["learning_queries"]["store"]
    capsys.readouterr()
    assert main(["learn-weights", "--train", str(pipeline / "ft"), "--queries", generated, "--lambda-c", "auto",
                 "--kernel", "shared", "--k", "3", "--steps", "20", "--out", str(out), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    doc, plain = json.loads(out.read_text()), json.loads(learned.read_text())
    prov = doc["provenance"]
    assert prov["spec"]["guard"] == "auto"
    assert prov["learner"]["guard_mode"] == "holdout" and prov["learner"]["guard_requested"] == "auto"
    shrink = prov["guard"]["shrink"]
    gain, se = ([table[str(a)] for a in (0.0, 0.25, 0.5, 0.75, 1.0)] for table in (prov["guard"]["gain_by_shrink"],
                                                                                 prov["guard"]["se_by_shrink"]))
    best = int(np.argmin(gain))   # the one-standard-error rule, from the recorded held-out gains
    assert shrink == (0.0 if gain[best] + se[best] >= 0 else
                      next(a for a, g in zip((0.0, 0.25, 0.5, 0.75, 1.0), gain) if g <= gain[best] + se[best]))
    names = list(plain["weights"])
    theta = np.log([plain["weights"][n] for n in names])
    shrunk = np.exp(shrink * (theta - theta.max()))
    np.testing.assert_allclose([doc["weights"][n] for n in names], shrunk / shrunk.sum(), rtol=1e-9, atol=1e-12)
    said = {0.0: "holdout guard: kept uniform", 1.0: "holdout guard: kept as learned"}.get(
        shrink, f"holdout guard: shrink {shrink:g} towards uniform")
    assert said in line, line

