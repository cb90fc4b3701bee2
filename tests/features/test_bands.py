"""Timestep bands: each (group × band) block equals a plain autograd gradient of the measurement averaged over
that band's timesteps, projected with the group's matrix; the bands add up to the whole-schedule features;
stores without bands are unchanged; bad input is one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.unet import build_featurizer, featurize_unet, random_inputs, tiny_model
from gradtrace.adapters.diffusion.measure import band_timesteps, example_noise, timestep_grid
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
T, N_BANDS = 6, 3


def test_band_split_is_contiguous_high_noise_first():
    grid = timestep_grid(T, 1000)
    bands = band_timesteps(grid, 3)
    assert bands == [tuple(grid[4:]), tuple(grid[2:4]), tuple(grid[:2])]
    assert [len(b) for b in band_timesteps(timestep_grid(7, 1000), 3)] == [3, 2, 2]
    with pytest.raises(UserError, match="--timestep-bands must be in 1..6"):
        band_timesteps(grid, 7)


@pytest.mark.parametrize("measurement", ["dtrak", "loss"])
def test_band_blocks_equal_an_autograd_loop_and_sum_to_the_whole(tmp_path, measurement):
    model, scheduler = tiny_model("conditional")
    x, ids, cond = random_inputs(model, 3)
    spec = dict(groups="block", projection="rademacher", total_dim=96, measurement=measurement, num_timesteps=T,
                chunk_rows=2)
    banded = featurize_unet(model, scheduler, x, ids, tmp_path / "b", spec=FeatureSpec(**spec, timestep_bands=N_BANDS),
                            cond=cond, model_fingerprint="m", progress=False)
    whole = featurize_unet(model, scheduler, x, ids, tmp_path / "w", spec=FeatureSpec(**spec), cond=cond,
                           model_fingerprint="m", progress=False)
    feat, groups = build_featurizer(model, scheduler, FeatureSpec(**spec))
    names = [g.name for g in groups]
    assert banded.group_names == [f"{g}@{b}" for g in names for b in ("high", "mid", "low")]
    bands = band_timesteps(timestep_grid(T, scheduler.config.num_train_timesteps), N_BANDS)
    assert [b["timesteps"] for b in banded.settings["measurement"]["bands"]] == [list(b) for b in bands]
    assert banded.settings["spec"]["timestep_bands"] == N_BANDS and "timestep_bands" not in whole.settings["spec"]
    # the independent computation: per example and band, autograd of the band's mean measurement
    abar = scheduler.alphas_cumprod.to(torch.float32)
    params = dict(model.named_parameters())
    cols = {n: (s, e) for n, s, e in banded.group_slices}
    for b_i, (band, ts) in enumerate(zip(("high", "mid", "low"), bands)):
        for r in range(3):
            noise = example_noise(0, ids[r:r + 1], ts, tuple(x.shape[1:]))[0]
            t = torch.tensor(ts)
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x[r:r + 1] + (1 - a).sqrt() * noise
            c = torch.as_tensor(cond[r:r + 1]).expand(len(ts), -1)
            eps = model(xt, t, c)
            out = (eps ** 2).mean() if measurement == "dtrak" else ((eps - noise) ** 2).mean()
            model.zero_grad()
            out.backward()
            for j, g in enumerate(groups):
                flat = torch.cat([params[p].grad.reshape(-1) for p in g.params])[None]
                want = feat.projector.project(j, flat)[0].numpy()
                s, e = cols[f"{g.name}@{band}"]
                np.testing.assert_allclose(np.asarray(banded.features)[r, s:e], want, rtol=2e-4, atol=1e-6)
    # whole-schedule feature = Σ_b (T_b / T) band feature, with one projection per group
    total = np.zeros_like(np.asarray(whole.features))
    for name, s, e in whole.group_slices:
        for band, ts in zip(("high", "mid", "low"), bands):
            bs, be = cols[f"{name}@{band}"]
            total[:, s:e] += len(ts) / T * np.asarray(banded.features)[:, bs:be]
    np.testing.assert_allclose(total, np.asarray(whole.features), rtol=1e-4, atol=1e-6)


def test_kronecker_bands_sum_to_the_whole(tmp_path):
    model, scheduler = tiny_model("conditional")
    x, ids, cond = random_inputs(model, 3)
    spec = dict(groups="block", projection="kronecker", total_dim=512, measurement="dtrak", num_timesteps=4)
    banded = featurize_unet(model, scheduler, x, ids, tmp_path / "b", spec=FeatureSpec(**spec, timestep_bands=2),
                            cond=cond, model_fingerprint="m", progress=False)
    whole = featurize_unet(model, scheduler, x, ids, tmp_path / "w", spec=FeatureSpec(**spec), cond=cond,
                           model_fingerprint="m", progress=False)
    cols = {n: (s, e) for n, s, e in banded.group_slices}
    for name, s, e in whole.group_slices:
        parts = [np.asarray(banded.features)[:, slice(*cols[f"{name}@{b}"])] for b in ("high", "low")]
        np.testing.assert_allclose(0.5 * parts[0] + 0.5 * parts[1], np.asarray(whole.features)[:, s:e],
                                   rtol=1e-4, atol=1e-6)


def test_cli_bands_and_compatibility(tmp_path, capsys):
    assert main(["train", "--data", "shapes", "--n", "24", "--steps", "2", "--batch-size", "8",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    feat = ["--dim", "32", "--timesteps", "4", "--no-progress"]
    assert main(["featurize", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "ft"), *feat,
                 "--timestep-bands", "2"]) == 0
    assert main(["featurize", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "fq"), *feat,
                 "--data", "shapes", "--n", "4", "--data-seed", "1"]) == 0
    store, plain = FeatureStore.open(tmp_path / "ft"), FeatureStore.open(tmp_path / "fq")
    assert store.features.shape[1] == 2 * plain.features.shape[1]
    assert store.group_names == [f"{g}@{b}" for g in plain.group_names for b in ("high", "low")]
    capsys.readouterr()
    # queries without bands do not score against a banded training store
    assert main(["attribute", "--train", str(tmp_path / "ft"), "--queries", str(tmp_path / "fq"),
                 "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "do not match" in capsys.readouterr().err
    assert main(["featurize", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "bad"), *feat,
                 "--timestep-bands", "5"]) == 2
    err = capsys.readouterr().err
    assert "--timestep-bands must be in 1..4" in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()
