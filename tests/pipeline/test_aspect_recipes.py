"""Aspect recipes through the CLI: `featurize --condition-on` (other attribute tokens null) equals featurizing
hand-nulled codes; `learn-weights --objective family --family COLUMN` equals the family learner called on the
learning queries' sampled values; refusals are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gradtrace.adapters import get_adapter
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for
from gradtrace.features.store import FeatureStore
from gradtrace.methods import configure
from gradtrace.pipeline import SampleSpec, sample_run
from gradtrace.weights.inside_lambda import INSIDE_GRID

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = ["--dim", "32", "--timesteps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    assert main(["train", "--data", "shapes", "--n", "36", "--steps", "2", "--batch-size", "12",
                 "--out", str(root / "run"), "--no-progress"]) == 0
    assert main(["featurize", "--checkpoint", str(root / "run"), "--out", str(root / "ft"), *FEAT]) == 0
    return root


def test_condition_on_nulls_the_other_tokens(run):
    assert main(["featurize", "--checkpoint", str(run / "run"), "--out", str(run / "fs"), "--condition-on", "style",
                 *FEAT]) == 0
    store = FeatureStore.open(run / "fs")
    meta = load_dataset("shapes", n=36).metadata
    styles = get_adapter().load(str(run / "run")).model.attribute_values["style"]
    want = np.full((36, 3), -1)
    want[:, 1] = [styles.index(m["style"]) for m in meta]
    np.testing.assert_array_equal(store.cond, want)
    assert store.settings["source"]["condition_on"] == "style"
    # independent: the features stage on the same images with hand-nulled codes
    adapter = get_adapter()
    ckpt = adapter.load(str(run / "run"))
    spec = FeatureSpec(**{k: v for k, v in store.settings["spec"].items()})
    feat, _ = featurizer_for(adapter, ckpt, spec)
    ex = adapter.examples(ckpt.model_config, store.settings["source"], ids=store.ids)
    other = featurize(feat, ex.images, ex.ids, run / "hand", spec=spec, cond=want, model_fingerprint=ckpt.fingerprint,
                      source={"hand": True}, progress=False)
    np.testing.assert_array_equal(np.asarray(store.features), np.asarray(other.features))
    assert not np.array_equal(np.asarray(store.features), np.asarray(FeatureStore.open(run / "ft").features))



def test_attribute_warns_when_queries_and_training_store_are_conditioned_differently(run, capsys):
    """Image-only queries (--condition-on none) against a training store featurized with its tokens: one warning
    line naming both and the fix; the same conditioning on both sides: no warning."""
    assert main(["featurize", "--checkpoint", str(run / "run"), "--out", str(run / "fq-none"), "--condition-on",
                 "none", "--data", "shapes", "--data-seed", "1", "--n", "6", *FEAT]) == 0
    assert main(["featurize", "--checkpoint", str(run / "run"), "--out", str(run / "ft-none"), "--condition-on",
                 "none", *FEAT]) == 0
    capsys.readouterr()
    assert main(["attribute", "--train", str(run / "ft"), "--queries", str(run / "fq-none"), "--out",
                 str(run / "a-mixed"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "conditioned on" in line]
    assert len(lines) == 1, err
    assert "conditioned on none" in lines[0] and "on every attribute" in lines[0]
    assert "--condition-on none" in lines[0]
    assert main(["attribute", "--train", str(run / "ft-none"), "--queries", str(run / "fq-none"), "--out",
                 str(run / "a-same"), "--no-progress"]) == 0
    assert "conditioned on" not in capsys.readouterr().err
    # generated learning queries are featurized the training store's way (here: null tokens), so no warning either
    assert main(["learn-weights", "--train", str(run / "ft-none"), "--generate", "4", "--sample-steps", "3",
                 "--steps", "5", "--lambda-c", "0.01", "--no-progress"]) == 0
    assert "conditioned on" not in capsys.readouterr().err
    sets = list((run / "ft-none" / "weights" / "learning-queries").iterdir())
    assert len(sets) == 1
    learned_on = FeatureStore.open(sets[0] / "features")
    assert learned_on.settings["source"]["condition_on"] == "none"
    np.testing.assert_array_equal(learned_on.cond, np.full((4, 3), -1))
    # learning queries given with another conditioning: the warning names them
    assert main(["learn-weights", "--train", str(run / "ft-none"), "--queries", str(run / "ft"), "--steps", "5",
                 "--lambda-c", "0.01", "--out", str(run / "w-mixed.json"), "--no-progress"]) == 0
    assert "conditioned on every attribute" in capsys.readouterr().err

def test_aspect_weights_on_the_shared_kernel_warn(run, capsys):
    """`learn-weights --aspect` on the shared kernel: one warning line naming the fix; per-group (the default) and
    general weights on the shared kernel: none."""
    capsys.readouterr()
    common = ["learn-weights", "--train", str(run / "ft"), "--generate", "4", "--sample-steps", "2", "--steps", "3",
              "--lambda-c", "0.01", "--no-progress"]
    assert main([*common, "--aspect", "style", "--kernel", "shared", "--out", str(run / "w-sh.json")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "shared kernel" in line]
    assert len(lines) == 1 and "aspect weights (style)" in lines[0] and "--kernel per-group" in lines[0]
    assert json.loads((run / "w-sh.json").read_text())["provenance"]["aspect"] == "style"
    assert main([*common, "--aspect", "style", "--out", str(run / "w-pg.json")]) == 0
    assert main([*common, "--kernel", "shared", "--out", str(run / "w-gen.json")]) == 0
    assert "shared kernel" not in capsys.readouterr().err


def test_family_objective_from_the_cli(run):
    from gradtrace.attribution import fit_method
    from gradtrace.weights.family import learn_family_weights

    codes = np.array([[s % 6, s % 4, (s // 4) % 4] for s in range(24)])
    sample_run(SampleSpec(checkpoint=str(run / "run"), out=str(run / "learn"), num=24, codes=codes, sample_steps=2,
                          seed=5), progress=False)
    assert main(["featurize", "--checkpoint", str(run / "run"), "--samples", str(run / "learn"),
                 "--out", str(run / "fl"), *FEAT]) == 0
    out = run / "w.json"
    assert main(["learn-weights", "--train", str(run / "ft"), "--queries", str(run / "fl"), "--method", "trak",
                 "--lambda-c", "0.1", "--objective", "family", "--family", "style", "--steps", "20",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    train, learn = FeatureStore.open(run / "ft"), FeatureStore.open(run / "fl")
    styles = get_adapter().load(str(run / "run")).model.attribute_values["style"]
    fitted = fit_method(train, "trak", kernel="per-group", c=0.1, progress=False)
    want = learn_family_weights(fitted, np.asarray(learn.features), [styles[c] for c in codes[:, 1]], k=10,
                                steps=20, lr=0.05, l2=0.0, progress=False)
    np.testing.assert_allclose([doc["weights"][n] for n in train.group_names], want.weights, rtol=1e-10)
    assert doc["provenance"]["spec"]["objective"] == "family" and doc["learning"]["steps"] == 20
    # --family alone (objective auto) asks for the family objective too
    assert main(["learn-weights", "--train", str(run / "ft"), "--queries", str(run / "fl"), "--method", "trak",
                 "--lambda-c", "0.1", "--family", "style", "--steps", "20", "--out", str(run / "w-fam.json"),
                 "--no-progress"]) == 0
    same = json.loads((run / "w-fam.json").read_text())
    assert same["weights"] == doc["weights"] and same["provenance"]["objective"] == "family"


@pytest.mark.parametrize("args, message", [
    (["featurize", "--condition-on", "colour", *FEAT],
     "the model's attributes are subject, style, background; pick one (or none)"),
    (["learn-weights", "--objective", "family", "--generate", "4"], "needs --family COLUMN"),
    (["learn-weights", "--objective", "family", "--family", "style", "--guard", "holdout", "--generate", "4"],
     "works with --objective snr only"),
])
def test_refusals(run, tmp_path, capsys, args, message):
    where = ["--checkpoint", str(run / "run")] if args[0] == "featurize" else ["--train", str(run / "ft")]
    assert main([args[0], *where, "--out", str(tmp_path / "x"), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_aspect_weights_learn_with_the_family_objective_by_default(run, capsys):
    """`learn-weights --generate N --aspect style` (objective auto): the family objective, families = the style each
    learning query was generated with, equal to the family learner called on those queries and values; --objective
    snr keeps the SNR learner; --guard holdout falls back to SNR in one warning line."""
    from gradtrace.attribution import fit_method
    from gradtrace.weights import learn_weights
    from gradtrace.weights.family import learn_family_weights

    common = ["learn-weights", "--train", str(run / "ft"), "--generate", "24", "--aspect", "style", "--sample-steps",
              "2", "--steps", "6", "--lambda-c", "0.1", "--no-progress"]
    capsys.readouterr()
    assert main([*common, "--out", str(run / "w-auto.json")]) == 0
    assert "SNR objective" not in capsys.readouterr().err
    doc = json.loads((run / "w-auto.json").read_text())
    made = FeatureStore.open(doc["provenance"]["learning_queries"]["store"])
    styles = get_adapter().load(str(run / "run")).model.attribute_values["style"]
    cond = np.load(made.settings["source"]["path"] + "/cond.npy")
    assert (cond[:, [0, 2]] == -1).all() and len(set(cond[:, 1])) < 8  # only style set, values repeat
    train = FeatureStore.open(run / "ft")
    fitted = fit_method(train, "trak", kernel="per-group", c=0.1, progress=False)
    phi = np.asarray(made.features)
    want = learn_family_weights(fitted, phi, [styles[c] for c in cond[:, 1]], k=10, steps=6, lr=0.05, l2=0.0,
                                progress=False)
    got = [doc["weights"][n] for n in train.group_names]
    np.testing.assert_allclose(got, want.weights, rtol=1e-10)
    assert doc["provenance"]["objective"] == "family" and doc["provenance"]["spec"]["objective"] == "auto"
    assert doc["provenance"]["learner"]["family_signal"]["learned"]  # the families agree: weights were learned

    assert main([*common, "--objective", "snr", "--out", str(run / "w-snr.json")]) == 0
    snr = json.loads((run / "w-snr.json").read_text())
    want_snr = learn_weights(fitted, phi, k=10, steps=6, lr=0.05, l2=0.0, progress=False)
    np.testing.assert_allclose([snr["weights"][n] for n in train.group_names], want_snr.weights, rtol=1e-10)
    assert snr["provenance"]["objective"] == "snr"

    capsys.readouterr()
    assert main([*common, "--guard", "holdout", "--out", str(run / "w-guard.json")]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "SNR objective" in ln]
    assert len(lines) == 1 and "--guard holdout" in lines[0], lines
    assert json.loads((run / "w-guard.json").read_text())["provenance"]["objective"] == "snr"


def _family_criterion(scores, families, k):
    """Within-family minus across-family mean agreement A(q, q') = (1/k) Σ_{n ∈ top-k(q)} z_q'(n), plain numpy."""
    scores = np.asarray(scores, dtype=np.float64)
    z = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    agree = np.stack([z[:, t].mean(axis=1) for t in top])       # agree[q, q'] = A(q, q')
    fam = np.asarray(families)
    same = (fam[:, None] == fam[None, :]) & ~np.eye(len(fam), dtype=bool)
    return agree[same].mean() - agree[fam[:, None] != fam[None, :]].mean()


def test_aspect_family_weights_on_the_shared_kernel_act_inside_it(run, tmp_path, capsys):
    """`learn-weights --aspect style --kernel shared` (objective auto): the family weights are learned on the
    per-group kernel's contributions and recorded to act inside the shared kernel, at the c of the inside grid (from
    the general weights' c upward) whose scores give the learning queries the best family criterion (each c fitted by
    TRAK with the weights inside, the criterion by plain numpy); `attribute --aspect style --kernel shared` then
    scores like TRAK fitted on features whose block j is scaled by √w_j (a plain numpy solve)."""
    from gradtrace.attribution import fit_method
    from gradtrace.weights.family import learn_family_weights

    ft = run / "ft"
    common = ["learn-weights", "--train", str(ft), "--sample-steps", "2", "--steps", "6", "--kernel", "shared",
              "--no-progress"]
    assert main([*common, "--generate", "6", "--lambda-c", "0.3"]) == 0           # general weights, c = 0.3
    capsys.readouterr()
    assert main([*common, "--generate", "24", "--aspect", "style"]) == 0           # λ auto
    said = capsys.readouterr().out
    assert "(family objective, inside the shared kernel at c = " in said
    general, path = ft / "weights" / "trak-shared-general.json", ft / "weights" / "trak-shared-style.json"
    try:
        prov = json.loads(path.read_text())["provenance"]
        assert (prov["apply"], prov["objective"], prov["kernel"]) == ("inside", "family", "shared")
        assert prov["lambda_grid"]["rule"] == "the family criterion inside the shared kernel"
        assert prov["learned_on"]["kernel"] == "per-group" and prov["learner"]["family_signal"]["learned"]
        train = FeatureStore.open(ft)
        learn = FeatureStore.open(prov["learning_queries"]["store"])
        styles = get_adapter().load(str(run / "run")).model.attribute_values["style"]
        cond = np.load(learn.settings["source"]["path"] + "/cond.npy")
        fitted = fit_method(train, "trak", kernel="per-group", c=prov["learned_on"]["lambda_c"], progress=False)
        want = learn_family_weights(fitted, np.asarray(learn.features), [styles[c] for c in cond[:, 1]], k=10,
                                    steps=6, lr=0.05, l2=0.0, progress=False).weights
        w = np.array([json.loads(path.read_text())["weights"][n] for n in train.group_names])
        np.testing.assert_allclose(w, want, rtol=1e-10)
        fam = [styles[c] for c in cond[:, 1]]
        crit, grid = [], [c for c in INSIDE_GRID if c >= 0.3]  # from the general weights' c upward
        for c in grid:
            base = configure("trak", kernel="shared", c=c).with_feature_weights(dict(zip(train.group_names, w)))
            crit.append(_family_criterion(base.fit(train.features, train.group_slices).scores(learn.features), fam, 10))
        c_best = grid[int(np.argmax(crit))]
        assert prov["lambda_c"] == c_best and c_best != 0.3 and f"kernel at c = {c_best:g}; loss" in said
        assert prov["lambda_grid"]["floor"] == 0.3 and [g for g, _ in prov["lambda_grid"]["grid"]] == grid
        np.testing.assert_allclose([-loss for _, loss in prov["lambda_grid"]["grid"]], crit, rtol=1e-4, atol=1e-7)

        assert main(["featurize", "--checkpoint", str(run / "run"), "--out", str(tmp_path / "q"), "--data", "shapes",
                     "--data-seed", "1", "--n", "5", *FEAT]) == 0
        assert main(["attribute", "--train", str(ft), "--queries", str(tmp_path / "q"), "--aspect", "style",
                     "--kernel", "shared", "--out", str(tmp_path / "a"), "--no-report", "--no-progress"]) == 0
        doc = json.loads((tmp_path / "a" / "attributions.json").read_text())
        assert doc["manifest"]["weights"]["apply"] == "inside"
        d = np.concatenate([np.full(e - s, np.sqrt(wj)) for (_, s, e), wj in zip(train.group_slices, w)])
        x = np.asarray(train.features, dtype=np.float64) * d
        q = np.asarray(FeatureStore.open(tmp_path / "q").features, dtype=np.float64) * d
        g = x.T @ x
        plain = q @ np.linalg.solve(g + c_best * np.mean(np.diag(g)) * np.eye(len(g)), x.T)
        got = np.load(tmp_path / "a" / "scores.npy")
        np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
    finally:
        general.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def test_families_without_a_signal_keep_uniform_weights(run, tmp_path, capsys):
    """Family values that the queries' scores do not follow (a shuffle whose permutation p-value is above 0.05,
    checked here): `learn-weights --objective family --kernel shared` warns in one line, keeps uniform weights on
    the query side at the given c, and `attribute` with them scores as the plain shared kernel."""
    from gradtrace.attribution import fit_method, score_queries
    from gradtrace.weights.family import family_signal

    ft = run / "ft"
    assert main(["featurize", "--checkpoint", str(run / "run"), "--out", str(tmp_path / "lq"), "--data", "shapes",
                 "--data-seed", "3", "--n", "12", *FEAT]) == 0
    lq, train = FeatureStore.open(tmp_path / "lq"), FeatureStore.open(ft)
    scores = fit_method(train, "trak", kernel="per-group", c=0.1, progress=False).scores(np.asarray(lq.features))
    for seed in range(50):
        labels = [str(v) for v in np.random.default_rng(seed).permutation(["x", "y", "z"] * 4)]
        if family_signal(scores, labels, 10)[1] > 0.05:
            break
    else:
        pytest.fail("no shuffle without a family signal among 50")
    (tmp_path / "fam.jsonl").write_text("".join(json.dumps({"id": int(i), "mark": v}) + "\n"
                                                for i, v in zip(lq.ids, labels)))
    capsys.readouterr()
    assert main(["learn-weights", "--train", str(ft), "--queries", str(tmp_path / "lq"), "--objective", "family",
                 "--family", "mark", "--family-labels", str(tmp_path / "fam.jsonl"), "--kernel", "shared",
                 "--lambda-c", "0.1", "--steps", "6", "--out", str(tmp_path / "w.json"), "--no-progress"]) == 0
    said = capsys.readouterr()
    lines = [ln for ln in said.err.splitlines() if "no more than across them" in ln]
    assert len(lines) == 1 and "weights stay uniform" in lines[0], said.err
    assert "kept uniform: no family signal" in said.out
    doc = json.loads((tmp_path / "w.json").read_text())
    prov = doc["provenance"]
    assert prov.get("apply", "query") == "query" and prov["lambda_c"] == 0.1
    assert not prov["learner"]["family_signal"]["learned"] and prov["learner"]["family_signal"]["p_value"] > 0.05
    np.testing.assert_allclose(list(doc["weights"].values()), 1 / len(train.group_names))
    q = FeatureStore.open(run / "ft")  # any compatible queries: the training store itself
    got = score_queries(train, q, method="trak", kernel="shared", weights_path=tmp_path / "w.json",
                        progress=False).scores()
    plain = fit_method(train, "trak", kernel="shared", c=0.1, progress=False).scores(np.asarray(q.features))
    want = plain / len(train.group_names)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
