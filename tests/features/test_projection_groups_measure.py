"""Projection unbiasedness, parameter groups and noise seeding, against independent computations."""
import math

import numpy as np
import pytest
import torch

from gradtrace.adapters import get_adapter
from gradtrace.adapters.diffusion.groups import block_key
from gradtrace.adapters.diffusion.measure import Measurement, example_noise, timestep_grid
from gradtrace.errors import UserError
from gradtrace.features.groups import make_groups
from gradtrace.features.projection import GroupProjector, split_dims


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_inner_products_are_unbiased(kind):
    d, k, reps = 300, 16, 400
    gen = torch.Generator().manual_seed(123)
    a = torch.randn(d, generator=gen)
    b = 0.6 * a + torch.randn(d, generator=gen)
    true = float(a @ b)
    est = []
    for seed in range(reps):
        proj = GroupProjector.create(kind, ["g"], [d], dims=[k], seed=seed)
        pa, pb = proj.project(0, torch.stack([a, b]))
        est.append(float(pa @ pb))
    est = np.array(est)
    # Closed-form variance of one estimate (independent entries of variance 1/k):
    # Gaussian: (|a|²|b|² + (a·b)²)/k ; Rademacher subtracts 2 Σ a_i² b_i² / k.
    var = (float(a @ a) * float(b @ b) + true ** 2) / k
    if kind == "rademacher":
        var -= 2 * float((a ** 2) @ (b ** 2)) / k
    assert est.var(ddof=1) == pytest.approx(var, rel=0.25)  # the estimator has the predicted spread
    se = math.sqrt(var / reps)
    assert abs(est.mean() - true) < 4 * se  # and is centred on the truth (4 standard errors)


def test_projection_is_seeded_and_identity_is_exact():
    p1 = GroupProjector.create("rademacher", ["a", "b"], [50, 40], dims=[8, 8], seed=3)
    p2 = GroupProjector.create("rademacher", ["a", "b"], [50, 40], dims=[8, 8], seed=3)
    p3 = GroupProjector.create("rademacher", ["a", "b"], [50, 40], dims=[8, 8], seed=4)
    assert torch.equal(p1.matrix(0), p2.matrix(0))
    assert not torch.equal(p1.matrix(0), p3.matrix(0))
    assert not torch.equal(p1.matrix(0)[:40], p1.matrix(1))  # groups get their own matrices
    x = torch.randn(3, 50)
    ident = GroupProjector.create("identity", ["a"], [50])
    assert torch.equal(ident.project(0, x), x)


def test_split_dims_respects_caps_and_total():
    sizes = [10, 1000, 100000, 3]
    dims = split_dims(sizes, 4000)
    assert dims[0] == 10 and dims[3] == 3  # small groups whose share reaches their size are kept exact
    assert all(1 <= k <= s for k, s in zip(dims, sizes))
    assert abs(sum(dims) - 4000) <= len(sizes)
    assert dims[2] > dims[1]  # ∝ √d among uncapped groups
    assert dims[2] / dims[1] == pytest.approx(math.sqrt(100), rel=0.05)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 1))


def test_group_presets_cover_all_parameters_disjointly():
    model = _Toy()
    names = [n for n, _ in model.named_parameters()]
    for preset in ("tensor", "module", "block"):  # block: the diffusion adapter's preset
        groups = make_groups(model, preset, get_adapter("diffusion-unet").group_key)
        flat = [p for g in groups for p in g.params]
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert [g.name for g in make_groups(model, "module")] == ["a", "b.0", "b.1"]
    custom = make_groups(model, "first=^a\\.;deep=b\\.1")
    assert [(g.name, g.params) for g in custom] == [
        ("first", ("a.weight", "a.bias")), ("other", ("b.0.weight", "b.0.bias")),
        ("deep", ("b.1.weight", "b.1.bias"))]
    with pytest.raises(UserError, match="unknown group preset"):
        make_groups(model, "layers")


def test_block_preset_names_for_diffusers_structure():
    assert block_key("unet.conv_in.weight") == "conv_in"
    assert block_key("unet.time_embedding.linear_1.bias") == "time_embedding"
    assert block_key("unet.down_blocks.1.resnets.0.conv1.weight") == "down_blocks.1"
    assert block_key("unet.down_blocks.1.attentions.0.to_k.weight") == "down_blocks.1.self_attn.k"
    assert block_key("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight") \
        == "up_blocks.1.self_attn.out"
    assert block_key("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight") \
        == "mid_block.cross_attn.v"
    assert block_key("unet.up_blocks.1.attentions.0.proj_in.weight") == "up_blocks.1"
    assert block_key("unet.conv_norm_out.weight") == "conv_out"
    assert block_key("cond_embed.tables.style") == "cond_embed"


def test_timestep_grid_is_uniform():
    assert timestep_grid(10, 1000) == tuple(range(50, 1000, 100))
    assert timestep_grid(1, 1000) == (500,)
    with pytest.raises(UserError):
        timestep_grid(0, 1000)


def test_noise_depends_only_on_seed_id_and_timestep():
    ts = timestep_grid(4, 1000)
    batch = example_noise(7, [5, 9, 2], ts, (1, 4, 4))
    alone = example_noise(7, [9], ts, (1, 4, 4))
    reordered = example_noise(7, [2, 5, 9], ts, (1, 4, 4))
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(batch[0], reordered[1]) and torch.equal(batch[2], reordered[0])
    assert not torch.equal(example_noise(8, [9], ts, (1, 4, 4)), alone)
    assert not torch.equal(batch[1, 0], batch[1, 1])  # timesteps draw different noise
    z = example_noise(0, np.arange(200), ts, (1, 4, 4))
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, abs=0.05)


def test_measurement_reductions_match_definitions():
    m_loss = Measurement.create("loss", 2, 1000)
    eps, noise = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    assert float(m_loss.reduce(eps, noise)) == pytest.approx(float(((eps - noise) ** 2).sum() / eps.numel()))
    assert float(Measurement.create("dtrak", 2, 1000).reduce(eps, noise)) == pytest.approx(
        float((eps ** 2).sum() / eps.numel()))
    assert float(Measurement.create("mean", 2, 1000).reduce(eps, noise)) == pytest.approx(float(eps.mean()))
    with pytest.raises(UserError, match="unknown measurement"):
        Measurement.create("entropy", 2, 1000)
    abar = torch.linspace(0.99, 0.01, 1000)
    x0 = torch.randn(1, 1, 3, 3)
    nz = m_loss.noise([0], (1, 3, 3))
    xt, t = m_loss.noisy_inputs(x0, nz, abar)
    expected = abar[t[1]].sqrt() * x0[0] + (1 - abar[t[1]]).sqrt() * nz[0, 1]
    assert torch.allclose(xt[0, 1], expected)
