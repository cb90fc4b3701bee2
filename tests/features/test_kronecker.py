"""Kronecker (LoGra-style) features against exact per-example gradients and explicit projections."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fixtures.unet import build_featurizer, featurize_unet, random_inputs as _inputs, tiny_model as _model
from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.adapters.diffusion.measure import DiffusionObjective, Measurement
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec
from gradtrace.features.gradients import GradientFeaturizer
from gradtrace.features.groups import make_groups
from gradtrace.features.kron_projection import KroneckerProjector, factor_dims
from gradtrace.features.kronecker import KroneckerFeaturizer
from gradtrace.features.projection import GroupProjector
from gradtrace.features.store import FeatureStore

_EXACT: dict = {}


def _exact(kind, T=2):
    """(model, scheduler, inputs, groups, exact per-example gradients in group order), computed once per kind."""
    if kind not in _EXACT:
        model, sched = _model(kind)
        x, ids, cond = _inputs(model, 3, seed=1)
        fz, groups = build_featurizer(model, sched, FeatureSpec(projection="identity", num_timesteps=T))
        _EXACT[kind] = (model, sched, (x, ids, cond), groups, fz.features(x, ids, cond))
    return _EXACT[kind]


def _exact_members(model, groups, projector, exact):
    """Split exact per-example gradients (identity features, group order) into per-member matrices."""
    named = dict(model.named_parameters())
    cols, start = {}, 0
    for g in groups:
        for p in g.params:
            cols[p] = exact[:, start:start + named[p].numel()]
            start += named[p].numel()
    return [[np.concatenate([cols[p] for p in m.params], axis=1) for m in layout] for layout in projector.members]


def _explicit(projector, members):
    """Kronecker features computed from exact gradients: vec(P_outᵀ G P_in) and dense v P, concatenated."""
    blocks = []
    for layout, mats in zip(projector.members, members):
        for m, flat in zip(layout, mats):
            if m.kind == "kron":
                G = torch.from_numpy(flat).reshape(-1, *m.shape).double()
                p_out, p_in = projector.factor(m, "out"), projector.factor(m, "in")
                G = G if p_out is None else torch.einsum("oa,boi->bai", p_out.double(), G)
                G = G if p_in is None else G @ p_in.double()
                blocks.append(G.reshape(G.shape[0], -1).numpy())
            else:
                mat = projector.factor(m, "dense")
                blocks.append(flat if mat is None else flat.astype(np.float64) @ mat.double().numpy())
    return np.concatenate(blocks, axis=1)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_identity_factors_reproduce_exact_per_example_gradients(kind):
    model, sched, (x, ids, cond), groups, exact = _exact(kind)
    kron_fz, _ = build_featurizer(model, sched, FeatureSpec(projection="kronecker", num_timesteps=2,
                                                            total_dim=10 ** 7))
    assert all(kron_fz.projector.is_exact(j) for j in range(len(groups)))
    shapes = {m.shape for layout in kron_fz.projector.members for m in layout if m.kind == "kron"}
    assert (16, 16 * 9) in shapes and (32, 32) in shapes  # 3x3 convs (incl. the stride-2 one) and attention
    got = kron_fz.features(x, ids, cond)
    ref = np.concatenate([np.concatenate(ms, axis=1) for ms in _exact_members(model, groups, kron_fz.projector, exact)],
                         axis=1)
    assert got.shape == ref.shape == (3, sum(kron_fz.sizes))
    for b in range(3):
        assert _rel(got[b], ref[b]) <= 1e-5


@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_projected_features_equal_explicit_kronecker_projection_of_exact_gradients(kind):
    model, sched, (x, ids, cond), groups, exact = _exact(kind)
    kron_fz, _ = build_featurizer(model, sched, FeatureSpec(projection="kronecker", num_timesteps=2,
                                                            total_dim=512, projection_seed=5))
    proj = kron_fz.projector
    assert sum(proj.is_exact(j) for j in range(len(groups))) <= 2  # (tiny groups such as cond_pos stay exact)
    ref = _explicit(proj, _exact_members(model, groups, proj, exact))
    got = kron_fz.features(x, ids, cond)
    assert _rel(got, ref) <= 1e-5


def test_kronecker_inner_products_are_unbiased():
    """Over many projection seeds, per-group feature inner products centre on the exact ones."""
    model, sched, (x, ids, _), groups, exact = _exact("unconditional")
    base = KroneckerProjector.create(model, groups, total_dim=256, seed=0)
    members = _exact_members(model, groups, base, exact)
    mats = [[flat.reshape(3, *m.shape) if m.kind == "kron" else flat for m, flat in zip(layout, ms)]
            for layout, ms in zip(base.members, members)]
    pairs = [(0, 1), (0, 2), (1, 1)]
    truth = np.array([[float(np.concatenate(ms, 1)[a] @ np.concatenate(ms, 1)[b]) for a, b in pairs]
                      for ms in members])
    # The featurizer equals the explicit formula (as tested above) for a couple of seeds ...
    for s in (1, 2):
        proj = KroneckerProjector.create(model, groups, total_dim=256, seed=s)
        fz = KroneckerFeaturizer(model, DiffusionObjective.create(sched, "loss", 2), groups, proj)
        assert _rel(fz.features(x, ids), _explicit(proj, members)) <= 1e-5
    # ... and the explicit formula with each seed's factors gives the estimates.
    seeds = range(200)
    est = np.empty((len(seeds), len(groups), len(pairs)))
    for s in seeds:
        proj = KroneckerProjector.create(model, groups, total_dim=256, seed=s)
        for j, (layout, ms) in enumerate(zip(proj.members, mats)):
            blocks = []
            for m, a in zip(layout, ms):
                if m.kind == "kron":
                    p_out, p_in = proj.factor(m, "out"), proj.factor(m, "in")
                    a = a if p_out is None else np.matmul(p_out.numpy().T, a)
                    a = a if p_in is None else np.matmul(a, p_in.numpy())
                else:
                    mat = proj.factor(m, "dense")
                    a = a if mat is None else a @ mat.numpy()
                blocks.append(a.reshape(3, -1))
            block = np.concatenate(blocks, axis=1).astype(np.float64)
            est[s, j] = [block[a] @ block[b] for a, b in pairs]
    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(len(seeds))
    projected = np.array([not base.is_exact(j) for j in range(len(groups))])
    assert projected.sum() >= 10
    assert (se[projected] > 0).all()  # the estimates do vary with the seed
    assert (np.abs(mean - truth) <= 4 * se + 1e-6 * np.abs(truth).max()).all()
    # and, summed over groups, the total inner products too
    tot_mean, tot_se = est.sum(1).mean(0), est.sum(1).std(0, ddof=1) / math.sqrt(len(seeds))
    assert (np.abs(tot_mean - truth.sum(0)) <= 4 * tot_se).all()


def test_factor_dims_split_the_budget_evenly_capped_at_the_sides():
    assert factor_dims(32, 288, 64) == (8, 8)
    assert factor_dims(32, 32, 36) == (6, 6)
    assert factor_dims(3, 144, 16) == (3, 5)        # a capped side gives the rest to the other side
    assert factor_dims(4, 5, 100) == (4, 5)         # a budget beyond the size is exact
    assert factor_dims(1, 144, 20) == (1, 20)
    k_out, k_in = factor_dims(256, 32, 128)
    assert k_out * k_in == pytest.approx(128, rel=0.1) and abs(k_out - k_in) <= 1


class _Odd(nn.Module):
    """Convolutions with reflect padding, stride, dilation and 'same' padding; a Linear used twice; norms;
    a raw parameter (handled by the vmap fallback)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(6, 4, (3, 2), dilation=(2, 1), padding="same", bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]))
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x, t, cond=None):
        h = F.silu(self.c1(x * self.scale.view(1, 2, 1, 1)))
        h = self.gn(self.c2(h))
        seq = h.flatten(2).transpose(1, 2)                       # (R, L, 4)
        seq = self.ln(self.lin(F.silu(self.lin(seq))) + t.view(-1, 1, 1) / 1000)
        h = seq.transpose(1, 2).reshape(h.shape)
        return F.interpolate(self.out(h), size=x.shape[-2:])


def test_odd_layers_reused_modules_and_fallback_parameters_are_exact():
    model = _Odd()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    alphas = torch.linspace(0.999, 0.01, 1000)
    m = DiffusionObjective(Measurement.create("loss", 3, 1000), alphas)
    groups = make_groups(model, "tensor")
    x = torch.rand(4, 2, 8, 8) * 2 - 1
    ids = np.arange(4)
    exact_fz = GradientFeaturizer(model, m, groups,
                                  GroupProjector.create("identity", [g.name for g in groups], [1] * len(groups)))
    exact = exact_fz.features(x, ids)
    for total in (10 ** 6, 24):
        proj = KroneckerProjector.create(model, groups, total_dim=total, seed=3)
        fz = KroneckerFeaturizer(model, m, groups, proj)
        assert fz.vmap_params == ["scale"]
        got = fz.features(x, ids)
        ref = _explicit(proj, _exact_members(model, groups, proj, exact))
        assert _rel(got, ref) <= 1e-5


class _Sneaky(nn.Module):
    """Uses a Linear's weight outside the Linear's forward: hooks cannot see it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.lin = nn.Linear(8, 8)

    def forward(self, x, t, cond=None):
        return F.linear(self.conv(x), self.lin.weight)


def test_a_parameter_used_outside_its_module_is_refused():
    model = _Sneaky()
    groups = make_groups(model, "tensor")
    proj = KroneckerProjector.create(model, groups, total_dim=10 ** 4)
    fz = KroneckerFeaturizer(model, DiffusionObjective(Measurement.create("loss", 2, 1000),
                                                       torch.linspace(0.99, 0.01, 1000)), groups, proj)
    with pytest.raises(UserError, match="lin.weight do not add up to the batch gradient"):
        fz.features(torch.rand(2, 1, 8, 8), [0, 1])


def test_kronecker_store_records_its_layout_and_is_never_mixed_with_dense(tmp_path):
    model, sched = _model("unconditional")
    x, ids, _ = _inputs(model, 4)
    kw = dict(model_fingerprint=model_fingerprint(model), progress=False)
    spec = FeatureSpec(projection="kronecker", total_dim=256, num_timesteps=2, chunk_rows=3)
    kron = featurize_unet(model, sched, x, ids, tmp_path / "k", spec=spec, **kw)
    proj = kron.settings["projection"]
    assert proj["kind"] == "kronecker" and proj["total_dim"] == kron.features.shape[1] == kron.settings["dim"]
    conv = [m for m in proj["members"]["down_blocks.0"] if m["kind"] == "kron"][0]
    assert conv["stop"] - conv["start"] == conv["k_out"] * conv["k_in"]
    assert [g["stop"] - g["start"] for g in kron.settings["groups"]] == proj["dims"]
    # equal to computing the same examples in one go (chunking and resumption do not matter)
    fz, _ = build_featurizer(model, sched, spec)
    feats = fz.features(x, ids)
    np.testing.assert_allclose(np.asarray(kron.features), feats, rtol=1e-5, atol=1e-5 * np.abs(feats).max())
    half = featurize_unet(model, sched, x, ids, tmp_path / "h", spec=dataclasses.replace(spec, dtype="bfloat16"), **kw)
    assert np.load(tmp_path / "h" / "features.npy").dtype == np.uint16  # bfloat16 bits: half the bytes
    np.testing.assert_allclose(np.asarray(half.features), feats, rtol=1e-2, atol=1e-2 * np.abs(feats).max())
    with pytest.raises(UserError, match="'dtype' differs"):
        kron.check_compatible(half)
    dense = featurize_unet(model, sched, x, ids, tmp_path / "d",
                      spec=FeatureSpec(projection="rademacher", total_dim=256, num_timesteps=2), **kw)
    with pytest.raises(UserError, match="do not match training features"):
        FeatureStore.open(tmp_path / "k").check_compatible(dense)
    with pytest.raises(UserError, match="other settings"):
        featurize_unet(model, sched, x, ids, tmp_path / "k",
                  spec=FeatureSpec(projection="rademacher", total_dim=256, num_timesteps=2, chunk_rows=3), **kw)
    with pytest.raises(UserError, match="build_featurizer"):
        GroupProjector.create("kronecker", ["a"], [10])
