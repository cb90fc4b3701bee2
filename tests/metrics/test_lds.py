"""LDS arithmetic against peers and closed forms; subsets; ground-truth model outputs against a plain loop."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gradtrace.adapters.base import GT_STREAM
from gradtrace.adapters.diffusion.outputs import query_losses
from gradtrace.errors import UserError
from gradtrace.evaluate.outputs import OutputGrid
from gradtrace.evaluate.subsets import draw_subsets, load_subsets, save_subsets
from gradtrace.metrics.lds import bootstrap_ci, lds, lds_per_query, subset_mask, subset_predictions, summarize

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded for this module


def _problem(seed=0, n=30, q=7, s=12, m=15):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(q, n)).astype(np.float32)
    subsets_rows = np.stack([np.sort(rng.choice(n, m, replace=False)) for _ in range(s)])
    targets = rng.normal(size=(s, q))
    return scores, subsets_rows, targets


def test_lds_equals_dattri_on_the_same_arrays():
    from dattri.metric import lds as dattri_lds

    scores, rows, targets = _problem()
    train_ids = np.arange(scores.shape[1]) * 3 + 100  # ids differ from positions
    mask = subset_mask(train_ids[rows], train_ids)
    ours = lds(scores, mask, targets)
    corr, _ = dattri_lds(torch.from_numpy(scores.T.astype(np.float64)),
                         (torch.from_numpy(targets), torch.from_numpy(rows)))
    np.testing.assert_allclose(ours["per_query"], corr.numpy(), rtol=1e-10, atol=1e-12)
    assert ours["mean"] == pytest.approx(float(corr.mean()), abs=1e-12)
    assert ours["n_undefined"] == 0 and ours["warning"] is None


def test_subset_predictions_are_sums_over_subsets():
    scores, rows, _ = _problem(1)
    mask = subset_mask(rows, np.arange(scores.shape[1]))
    preds = subset_predictions(scores, mask)
    loop = np.array([[scores[q, r].astype(np.float64).sum() for q in range(scores.shape[0])] for r in rows])
    np.testing.assert_allclose(preds, loop, rtol=1e-12)


def test_query_with_equal_outputs_is_undefined_not_zero():
    scores, rows, targets = _problem(2)
    targets[:, 3] = -0.25       # every model gives query 3 the same output
    scores[5] = 0.0             # query 5: all predictions equal
    mask = subset_mask(rows, np.arange(scores.shape[1]))
    with pytest.warns(UserWarning, match="undefined for 2 of 7"):
        res = lds(scores, mask, targets, query_ids=np.arange(7) + 50)
    assert res["n_undefined"] == 2 and res["n_defined"] == 5
    assert res["undefined_query_ids"] == [53, 55]
    assert res["per_query"][3] is None and res["per_query"][5] is None
    assert "equal for every subset" in res["undefined_reasons"][53]
    preds = subset_predictions(scores, mask)
    expected = [spearmanr(preds[:, q], targets[:, q]).statistic for q in (0, 1, 2, 4, 6)]
    assert res["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    json.dumps(res, allow_nan=False)  # NaN is never written as a number


def test_all_undefined_has_no_mean():
    summary = summarize(np.full(4, np.nan))
    assert summary["mean"] is None and summary["n_undefined"] == 4 and "all 4" in summary["warning"]


def test_bootstrap_ci_matches_an_independent_resampling():
    values = np.random.default_rng(3).normal(0.3, 0.2, size=40)
    lo, hi = bootstrap_ci(values, n_bootstrap=500, seed=7)
    rng = np.random.default_rng(7)
    means = [values[rng.integers(0, 40, size=40)].mean() for _ in range(500)]
    assert (lo, hi) == (pytest.approx(np.quantile(means, 0.025)), pytest.approx(np.quantile(means, 0.975)))
    assert summarize(values, seed=7, n_bootstrap=500)["ci95"] == [lo, hi]
    # the normal-theory interval agrees roughly
    se = values.std(ddof=1) / np.sqrt(40)
    assert abs(lo - (values.mean() - 1.96 * se)) < 0.03 and abs(hi - (values.mean() + 1.96 * se)) < 0.03


def test_lds_per_query_refuses_bad_shapes():
    with pytest.raises(UserError):
        lds_per_query(np.zeros((1, 3)), np.zeros((1, 3)))
    with pytest.raises(UserError):
        lds_per_query(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(UserError, match="lack ids"):
        subset_mask(np.array([[1, 2, 99]]), np.arange(10))


def test_subsets_reproducible_from_seed_and_sized(tmp_path):
    ids = np.arange(0, 3 * 25, 3)  # N = 25, α·N = 12.5 -> round() = 12
    a = draw_subsets(ids, 6, 0.5, seed=11)
    b = draw_subsets(ids[::-1], 6, 0.5, seed=11)  # order of the ids does not matter
    c = draw_subsets(ids, 6, 0.5, seed=12)
    assert a.shape == (6, round(0.5 * 25)) and np.array_equal(a, b) and not np.array_equal(a, c)
    for row in a:
        assert np.all(np.diff(row) > 0) and np.isin(row, ids).all()
    assert len({tuple(r) for r in a}) == 6
    assert np.array_equal(draw_subsets(ids, 9, 0.5, seed=11)[:6], a)  # drawing more keeps the first ones
    assert draw_subsets(ids, 3, 0.3, seed=0).shape == (3, round(0.3 * 25))
    save_subsets(tmp_path, a, ids, 0.5, 11)
    loaded, doc = load_subsets(tmp_path)
    assert np.array_equal(loaded, a) and doc["seed"] == 11 and doc["subset_size"] == 12
    np.save(tmp_path / "subsets.npy", c)
    with pytest.raises(UserError, match="does not match"):
        load_subsets(tmp_path)
    for bad in (dict(fraction=1.0), dict(fraction=0.01), dict(n_subsets=1)):
        kw = {"n_subsets": 4, "fraction": 0.5, **bad}
        with pytest.raises(UserError):
            draw_subsets(ids, kw["n_subsets"], kw["fraction"], seed=0)


def test_query_losses_equal_a_plain_loop_with_diffusers_add_noise():
    from gradtrace.adapters.diffusion import build_model, default_model_config, make_scheduler
    from gradtrace.adapters.diffusion.measure import timestep_grid
    from gradtrace.io import derive_seed

    config = default_model_config("unconditional", channels=1, size=8)
    model = build_model(config, seed=3).eval()
    sched = make_scheduler(config)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    ids = np.array([7, 2, 40])
    grid = OutputGrid(num_timesteps=3, num_draws=2, seed=5)
    ours = query_losses(model, sched.alphas_cumprod, images, ids, None, grid, batch_rows=5)
    expected = np.zeros(3)
    with torch.no_grad():
        for q in range(3):
            vals = []
            for d in range(2):
                for t in timestep_grid(3, 1000):
                    gen = torch.Generator().manual_seed(derive_seed(derive_seed(GT_STREAM, 5, d), int(ids[q]), t))
                    eps = torch.randn((1, 8, 8), generator=gen)
                    xt = sched.add_noise(images[q:q + 1], eps[None], torch.tensor([t]))
                    pred = model(xt, torch.tensor([t]))
                    vals.append(float(((pred - eps[None]) ** 2).mean()))
            expected[q] = np.mean(vals)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    # the noise of a query depends only on its id: reordering the queries reorders the losses
    again = query_losses(model, sched.alphas_cumprod, images[[2, 0, 1]], ids[[2, 0, 1]], None, grid)
    np.testing.assert_allclose(again, ours[[2, 0, 1]], rtol=1e-5)
