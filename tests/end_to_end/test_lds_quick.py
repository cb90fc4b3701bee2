"""The quick LDS benchmark end to end, its numbers checked against dattri, and `gradtrace eval lds` on its outputs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradtrace.adapters.diffusion.outputs as unet_outputs
from gradtrace.adapters import get_adapter
from gradtrace.adapters.diffusion.outputs import query_losses
from gradtrace.cli import main as cli_main
from gradtrace.evaluate.outputs import OutputGrid, store_examples
from gradtrace.features.store import FeatureStore
from gradtrace.methods import get_method
from gradtrace.weights import choose_lambda_scale, load_weights

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_lds.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded for this module


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The script run as `python bench/bench_lds.py --quick` is (one torch thread, as this module's own checks)."""
    out = tmp_path_factory.mktemp("bench") / "lds"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out), "--no-progress"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _dattri_mean(out: Path, query_set: str, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query LDS from dattri, with targets read from the cache files and subsets from subsets.npy."""
    from dattri.metric import lds as dattri_lds

    train = FeatureStore.open(out / "features" / "loss" / "train")
    queries = FeatureStore.open(out / "features" / "loss" / query_set)
    subsets = np.load(out / "retrain" / "subsets.npy")
    manifest = json.loads((out / "retrain" / "manifest.json").read_text())["settings"]
    caches = [d for d in (out / "retrain" / "outputs").iterdir()
              if json.loads((d / "manifest.json").read_text())["query_ids"] == queries.ids.tolist()]
    assert len(caches) == 1
    losses = np.stack([np.load(next(caches[0].glob(f"{job}-*.npy"))) for job in manifest["jobs"]])
    rows = np.stack([np.searchsorted(train.ids, s) for s in subsets])  # train ids are sorted
    assert np.array_equal(train.ids[rows], subsets)
    corr, _ = dattri_lds(torch.from_numpy(scores.T.astype(np.float64)),
                         (torch.from_numpy(-losses), torch.from_numpy(rows)))
    return corr.numpy(), queries.features


def test_quick_bench_outputs_exist_and_are_finite_or_undefined(bench):
    results = json.loads((bench / "results.json").read_text())
    assert (bench / "results.md").read_text().startswith("LDS on digits")
    methods = {(r["method"], r["kernel"], r["weights"]) for r in results["rows"]}
    assert {("tracin", "identity", "uniform"), ("trak", "shared", "uniform"), ("trak", "per-group", "uniform"),
            ("dtrak", "shared", "uniform"), ("dtrak", "per-group", "uniform"), ("pixel -L2", "-", "-"),
            ("random", "-", "-")} <= methods
    for r in results["rows"]:
        for key in ("lds", "lds_heldout", "lds_samples"):
            s = r[key]
            assert s["n_defined"] + s["n_undefined"] == s["n_queries"]
            if s["mean"] is None:
                assert s["n_defined"] == 0 and s["warning"]
            else:
                assert math.isfinite(s["mean"]) and -1 <= s["mean"] <= 1
    for entry in results["per_group"].values():
        assert Path(entry["plot"]).stat().st_size > 0
    cf = results["counterfactual"]["summary"]
    assert math.isfinite(cf["delta_top"]["mean"]) and math.isfinite(cf["delta_random"]["mean"])
    assert (bench / "counterfactual" / "counterfactual.json").exists()


def test_bench_lds_equals_dattri(bench):

    results = json.loads((bench / "results.json").read_text())
    row = next(r for r in results["rows"] if (r["method"], r["kernel"], r["weights"]) == ("trak", "shared", "uniform"))
    train = FeatureStore.open(bench / "features" / "loss" / "train")
    fitted = get_method("trak", kernel="shared", c=row["c"]).fit(train.features, train.group_slices)
    per_query = []
    for query_set in ("heldout", "samples"):
        q = FeatureStore.open(bench / "features" / "loss" / query_set).features
        corr, _ = _dattri_mean(bench, query_set, fitted.scores(q))
        per_query.append(corr)
        one = row[f"lds_{query_set}"]
        assert one["n_undefined"] == int(np.isnan(corr).sum())
        if one["mean"] is not None:
            assert one["mean"] == pytest.approx(float(np.nanmean(corr)), abs=1e-9)
    corr = np.concatenate(per_query)
    if np.isfinite(corr).any():
        assert row["lds"]["mean"] == pytest.approx(float(np.nanmean(corr)), abs=1e-9)
    assert row["lds"]["n_undefined"] == int(np.isnan(corr).sum())


def test_cli_eval_lds_with_weights_file_and_cache(bench, tmp_path, monkeypatch, capsys):

    train = FeatureStore.open(bench / "features" / "loss" / "train")
    names = train.group_names
    w = np.linspace(0.2, 1.0, len(names))
    (tmp_path / "w.json").write_text(json.dumps({"weights": dict(zip(names, w.tolist()))}))
    cache = next(d for d in (bench / "retrain" / "outputs").iterdir()
                 if json.loads((d / "manifest.json").read_text())["query_ids"] ==
                 FeatureStore.open(bench / "features" / "loss" / "heldout").ids.tolist())
    victim = sorted(cache.glob("s0001-*.npy"))[0]
    before = np.load(victim)
    victim.unlink()
    calls = []
    real = unet_outputs.query_losses
    monkeypatch.setattr(unet_outputs, "query_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["eval", "lds", "--run", str(bench / "run"), "--retrain", str(bench / "retrain"), "--train-features",
            str(bench / "features" / "loss" / "train"), "--queries", str(bench / "features" / "loss" / "heldout"),
            "--method", "trak", "--kernel", "per-group", "--weights", str(tmp_path / "w.json"), "--per-group",
            "--timesteps", "2", "--draws", "1", "--out", str(tmp_path / "eval"), "--no-progress"]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert "LDS" in capsys.readouterr().out
    assert len(calls) == 1  # only the missing model is recomputed
    np.testing.assert_allclose(np.load(victim), before, rtol=1e-5)  # (thread counts may differ: not bitwise)
    doc = json.loads((tmp_path / "eval" / "lds.json").read_text())
    assert (tmp_path / "eval" / "lds_per_group.png").stat().st_size > 0 and set(doc["per_group"]) == set(names)
    assert doc["manifest"]["weights"]["weights"] == pytest.approx(dict(zip(names, w.tolist())))

    fitted = get_method("trak", kernel="per-group", c=0.01).fit(train.features, train.group_slices)
    q = FeatureStore.open(bench / "features" / "loss" / "heldout").features
    corr, _ = _dattri_mean(bench, "heldout", fitted.scores(q, weights=w))
    ours = np.array([np.nan if v is None else v for v in doc["lds"]["per_query"]])
    np.testing.assert_allclose(ours, corr, rtol=1e-9, atol=1e-12)
    saved = bench / "weights" / "trak-per-group.json"
    if saved.exists():  # a `learn-weights` artefact: used as is, refused on its own learning queries

        learned = json.loads(saved.read_text())["weights"]
        loaded, info = load_weights(saved, names)
        np.testing.assert_allclose(loaded, [learned[n] for n in names])
        with_file = args[:args.index("--weights") + 1] + [str(saved)] + args[args.index("--weights") + 2:]
        assert cli_main(with_file) == 0, capsys.readouterr().err
        capsys.readouterr()
        doc = json.loads((tmp_path / "eval" / "lds.json").read_text())
        assert doc["manifest"]["weights"]["weights"] == pytest.approx(learned)
        on_learning = [str(bench / "features" / "loss" / "learn") if a.endswith("heldout") else a for a in with_file]
        assert cli_main(on_learning) == 2
        err = capsys.readouterr().err.strip()
        assert "learning queries" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weights": {names[0]: 1.0}}))
    assert cli_main(args[:args.index("--weights") + 1] + [str(bad)] + args[args.index("--weights") + 2:]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_eval_lds_lambda_auto_chooses_c_on_the_learning_queries(bench, tmp_path, capsys):

    store = bench / "features" / "loss"
    base = ["eval", "lds", "--run", str(bench / "run"), "--retrain", str(bench / "retrain"), "--train-features",
            str(store / "train"), "--queries", str(store / "heldout"), "--method", "trak", "--kernel", "per-group",
            "--timesteps", "2", "--draws", "1", "--out", str(tmp_path / "eval"), "--no-progress"]
    assert cli_main(base + ["--lambda-c", "auto", "--learning-queries", str(store / "learn")]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    doc = json.loads((tmp_path / "eval" / "lds.json").read_text())
    chosen = doc["manifest"]["lambda"]
    train, learn = FeatureStore.open(store / "train"), FeatureStore.open(store / "learn")
    best, _ = choose_lambda_scale(train.features, train.group_slices, np.asarray(learn.features), method="trak",
                                  kernel="per-group", k=min(10, len(train.ids)))
    assert chosen["rule"].startswith("auto") and chosen["c"] == pytest.approx(float(best))
    assert chosen["learning_queries"]["store"] == str(learn.path)
    assert doc["manifest"]["method"]["c"] == pytest.approx(float(best))
    fitted = get_method("trak", kernel="per-group", c=float(best)).fit(train.features, train.group_slices)
    q = FeatureStore.open(store / "heldout").features
    corr, _ = _dattri_mean(bench, "heldout", fitted.scores(q))
    ours = np.array([np.nan if v is None else v for v in doc["lds"]["per_query"]])
    np.testing.assert_allclose(ours, corr, rtol=1e-9, atol=1e-12)
    # refused, one line, exit 2: the evaluation queries as learning queries, a non-number, a store without auto
    for extra in (["--lambda-c", "auto", "--learning-queries", str(store / "heldout")], ["--lambda-c", "nope"],
                  ["--learning-queries", str(store / "learn")], ["--lambda-c", "auto"]):
        assert cli_main(base[:-3] + ["--out", str(tmp_path / "refused")] + base[-1:] + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("lambda-c" in err or "learning" in err), err
    assert not (tmp_path / "refused").exists()


def test_counterfactual_removes_the_top_k_and_reports_loss_changes(bench):

    results = json.loads((bench / "results.json").read_text())
    doc = json.loads((bench / "counterfactual" / "counterfactual.json").read_text())
    settings = results["settings"]
    train = FeatureStore.open(bench / "features" / "loss" / "train")
    heldout = FeatureStore.open(bench / "features" / "loss" / "heldout")
    c = results["lambda"]["trak/per-group"]["c"]  # the label-free choice the bench made
    fitted = get_method("trak", kernel="per-group", c=c).fit(train.features, train.group_slices)
    learned = (results["learned_weights"] or {}).get("trak/per-group")
    w = None if learned is None else np.array([learned["weights"][n] for n in train.group_names])
    idx, _ = fitted.topk(np.asarray(heldout.features)[:settings["cf_queries"]], settings["cf_k"], w)
    adapter = get_adapter("diffusion-unet")
    full = adapter.load(bench / "run")
    ex = store_examples(adapter, full.model_config, heldout)
    images, ids = ex.images, ex.ids
    grid = OutputGrid(**{k: doc["manifest"]["model_output"]["grid"][k] for k in ("num_timesteps", "num_draws", "seed")})
    models = bench / "counterfactual" / "models"
    full = adapter.load(models / "full-r0")
    for q, row in enumerate(doc["per_query"]):
        assert row["query_id"] == int(ids[q])
        assert row["removed_top"] == sorted(train.ids[idx[q]].tolist())
        losses = {}
        for kind in ("top", "random"):
            ckpt = adapter.load(models / f"q{row['query_id']}-{kind}-r0")
            kept = set(ckpt.config["train_ids"])
            assert kept == set(train.ids.tolist()) - set(row[f"removed_{kind}"])
            assert len(row[f"removed_{kind}"]) == settings["cf_k"]
            losses[kind] = query_losses(ckpt.model, ckpt.extras["scheduler"].alphas_cumprod, images[q:q + 1],
                                        ids[q:q + 1], None, grid)[0]
        base = query_losses(full.model, full.extras["scheduler"].alphas_cumprod, images[q:q + 1], ids[q:q + 1], None,
                            grid)[0]
        assert row["delta_top"] == pytest.approx(losses["top"] - base, rel=1e-5, abs=1e-7)
        assert row["delta_random"] == pytest.approx(losses["random"] - base, rel=1e-5, abs=1e-7)
    assert doc["summary"]["delta_top"]["mean"] == pytest.approx(np.mean([r["delta_top"] for r in doc["per_query"]]))


def test_report_shows_the_lds_and_counterfactual_results(bench, tmp_path, capsys):
    import base64

    stores = bench / "features" / "loss"
    assert cli_main(["eval", "lds", "--run", str(bench / "run"), "--retrain", str(bench / "retrain"),
                     "--train-features", str(stores / "train"), "--queries", str(stores / "heldout"), "--per-group",
                     "--timesteps", "2", "--draws", "1", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert cli_main(["attribute", "--train", str(stores / "train"), "--queries", str(stores / "heldout"), "--top-k",
                     "3", "--no-report", "--out", str(tmp_path / "attr"), "--no-progress"]) == 0
    assert cli_main(["report", "--attributions", str(tmp_path / "attr"), "--lds", str(tmp_path / "eval"),
                     "--counterfactual", str(bench / "counterfactual"), "--out", str(tmp_path / "r.html"),
                     "--no-progress"]) == 0, capsys.readouterr().err
    text = (tmp_path / "r.html").read_text()
    lds = json.loads((tmp_path / "eval" / "lds.json").read_text())["lds"]
    assert f"{lds['mean']:.4f} [{lds['ci95'][0]:.4f}, {lds['ci95'][1]:.4f}]" in text
    assert base64.b64encode((tmp_path / "eval" / "lds_per_group.png").read_bytes()).decode() in text
    cf = json.loads((bench / "counterfactual" / "counterfactual.json").read_text())["summary"]
    assert f"{cf['delta_top']['mean']:.4f}" in text and f"{cf['fraction_top_above_random']:.2f}" in text
    n_queries = len(json.loads((tmp_path / "attr" / "attributions.json").read_text())["queries"])
    assert text.count('<section class="query"') == min(n_queries, 24)


def test_counterfactual_folder_is_reused_when_the_top_k_is_the_same(bench):
    """The folder's identity is the removed ids: weights scaled by 2 (the same top-k) reuse every model and
    record the new weights; another k (other removed ids) is refused in one line."""
    from gradtrace.errors import UserError
    from gradtrace.evaluate import counterfactual_run

    results = json.loads((bench / "results.json").read_text())
    settings, folder = results["settings"], bench / "counterfactual"
    before = json.loads((folder / "counterfactual.json").read_text())
    train = FeatureStore.open(bench / "features" / "loss" / "train")
    learned = (results["learned_weights"] or {}).get("trak/per-group")
    w = np.ones(len(train.group_names)) if learned is None else \
        np.array([learned["weights"][n] for n in train.group_names])
    grid = OutputGrid(**{k: before["manifest"]["model_output"]["grid"][k]
                         for k in ("num_timesteps", "num_draws", "seed")})
    kwargs = dict(method="trak", kernel="per-group", c=results["lambda"]["trak/per-group"]["c"], grid=grid,
                  num_queries=settings["cf_queries"], n_seeds=settings["seeds"], progress=False)
    doc = counterfactual_run(bench / "run", train.path, bench / "features" / "loss" / "heldout", folder,
                             weights=2.0 * w, k=settings["cf_k"], **kwargs)
    assert doc["stats"]["trained"] == 0
    assert doc["per_query"] == before["per_query"]
    assert doc["manifest"]["weights"] != before["manifest"]["weights"]
    with pytest.raises(UserError, match="'k' differs"):
        counterfactual_run(bench / "run", train.path, bench / "features" / "loss" / "heldout", folder,
                           weights=w, k=settings["cf_k"] + 1, **kwargs)
