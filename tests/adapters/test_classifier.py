"""The classifier adapter's models and measurements: per-example gradients of the margin and the cross-entropy
from gradtrace's featurizers against a plain autograd loop, the Kronecker path against explicit projections of
those gradients, the measurements against their definitions, the models against torch's own modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fixtures.classifiers import TINY, kind_and_options
from gradtrace.adapters import get_adapter
from gradtrace.adapters.classifier import ClassifierObjective, SelfAttention, block_key, measure
from gradtrace.data import load_dataset
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec, build_featurizer
from gradtrace.features.groups import make_groups

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = get_adapter("classifier")
B = 5


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n=40)


def model_of(name: str, ds, seed: int = 1):
    """A tiny classifier with weights moved off their initialisation (the ViT's head starts at zero)."""
    kind, options = kind_and_options(name)
    config = ADAPTER.default_model_config(ds, kind, model_options=options)
    model = ADAPTER.build(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for b in model.buffers():  # BatchNorm running statistics other than (0, 1)
            if b.dtype.is_floating_point:
                b.add_(0.3 * torch.rand(b.shape, generator=gen))
    return model.eval(), config


def batch(ds, config):
    x = ds.images[:B]
    y = ds.class_indices(config["label"], config["classes"], np.arange(B))
    return x, np.arange(B), y


def autograd_grads(model, name: str, x, y) -> dict[str, np.ndarray]:
    """{param: (B, numel)} each example's gradient of its measurement by loss.backward per example."""
    named = dict(model.named_parameters())
    out = {n: [] for n in named}
    for i in range(len(x)):
        model.zero_grad()
        logits = model(x[i:i + 1])[0]
        z_y = logits[int(y[i])]
        others = torch.cat([logits[:int(y[i])], logits[int(y[i]) + 1:]])
        value = z_y - torch.logsumexp(others, 0) if name == "margin" else torch.logsumexp(logits, 0) - z_y
        value.backward()
        for n, p in named.items():
            out[n].append(p.grad.reshape(-1).clone())
    return {n: torch.stack(v).double().numpy() for n, v in out.items()}


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------- measurements and models

def test_margin_and_cross_entropy_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    p = torch.softmax(logits, 1).numpy()
    py = p[np.arange(7), labels.numpy()]
    np.testing.assert_allclose(measure("margin", logits, labels).numpy(), np.log(py / (1 - py)), rtol=1e-10)
    np.testing.assert_allclose(measure("loss", logits, labels).numpy(), -np.log(py), rtol=1e-10)
    torch.testing.assert_close(measure("loss", logits, labels),
                               nn.functional.cross_entropy(logits, labels, reduction="none"))
    with pytest.raises(UserError, match="unknown measurement 'dtrak' for classifiers"):
        ClassifierObjective("dtrak")
    with pytest.raises(UserError, match="need labels"):
        ClassifierObjective("margin").example_inputs(torch.zeros(2, 1, 8, 8), np.arange(2), None)


def test_self_attention_is_multihead_attention():
    torch.manual_seed(0)
    attn = SelfAttention(12, 3)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    x = torch.randn(4, 7, 12)
    ref, _ = nn.MultiheadAttention.forward(attn, x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)
    assert isinstance(attn, nn.MultiheadAttention)


def test_names_follow_torchvision_and_block_groups(digits):
    resnet, _ = model_of("resnet", digits)
    names = [n for n, _ in resnet.named_parameters()]
    for n in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "fc.weight", "fc.bias"):
        assert n in names
    assert [g.name for g in make_groups(resnet, "block", ADAPTER.group_key)] == ["stem", "layer1.0", "layer2.0", "head"]
    vit, _ = model_of("vit", digits)
    names = [n for n, _ in vit.named_parameters()]
    for n in ("class_token", "conv_proj.weight", "encoder.pos_embedding",
              "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
              "encoder.layers.encoder_layer_0.self_attention.out_proj.weight",
              "encoder.layers.encoder_layer_0.mlp.0.weight", "encoder.layers.encoder_layer_0.mlp.3.weight",
              "encoder.layers.encoder_layer_0.ln_1.weight", "encoder.ln.weight", "heads.head.weight"):
        assert n in names
    assert [g.name for g in make_groups(vit, "block", ADAPTER.group_key)] == \
        ["embed", "layer0.attn", "layer0.mlp", "final_norm", "head"]
    factory, _ = model_of("factory", digits)
    assert [g.name for g in make_groups(factory, "block", ADAPTER.group_key)] == ["scale", "features", "classifier"]
    # torchvision's resnet18 / vit_b_16 names (as a factory model has them) land in the same groups
    assert block_key("layer4.1.downsample.0.weight") == "layer4.1" and block_key("bn1.bias") == "stem"
    assert block_key("encoder.layers.encoder_layer_11.mlp.3.bias") == "layer11.mlp"
    assert block_key("heads.head.weight") == "head"


def test_models_are_seeded_and_carry_their_config(digits):
    for name in TINY:
        kind, options = kind_and_options(name)
        config = ADAPTER.default_model_config(digits, kind, model_options=options)
        before = torch.random.get_rng_state()
        a, b, c = ADAPTER.build(config, seed=3), ADAPTER.build(config, seed=3), ADAPTER.build(config, seed=4)
        assert torch.equal(torch.random.get_rng_state(), before)
        assert a.config == config and a.config["arch"] == kind
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
        assert a(digits.images[:3]).shape == (3, 10)


# ---------------------------------------------------------------------------------- per-example gradients

@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("measurement", ["margin", "loss"])
def test_identity_features_equal_an_autograd_loop(digits, name, measurement):
    model, config = model_of(name, digits)
    x, ids, y = batch(digits, config)
    fz, groups = build_featurizer(model, ClassifierObjective(measurement),
                                  FeatureSpec(groups="block", projection="identity"), ADAPTER.group_key,
                                  ADAPTER.group_presets)
    got = fz.features(x, ids, y)
    ref = autograd_grads(model, measurement, x, y)
    want = np.concatenate([ref[p] for g in groups for p in g.params], axis=1)
    assert got.shape == want.shape == (B, sum(p.numel() for p in model.parameters()))
    for b in range(B):
        assert rel(got[b], want[b]) <= 1e-5, (name, b)
    assert np.abs(want).max() > 1e-3  # the gradients compared are not all zero


def explicit_kronecker(projector, grads: dict[str, np.ndarray]) -> np.ndarray:
    """Kronecker features from exact per-example gradients: per group, vec(P_outᵀ G P_in) per weight, then the
    dense member's concatenated gradient times its matrix."""
    blocks = []
    for layout in projector.members:
        for m in layout:
            if m.kind == "kron":
                G = torch.from_numpy(grads[m.params[0]]).reshape(-1, *m.shape)
                p_out, p_in = projector.factor(m, "out"), projector.factor(m, "in")
                G = G if p_out is None else torch.einsum("oa,boi->bai", p_out.double(), G)
                G = G if p_in is None else G @ p_in.double()
                blocks.append(G.reshape(G.shape[0], -1).numpy())
            else:
                flat = np.concatenate([grads[p] for p in m.params], axis=1)
                mat = projector.factor(m, "dense")
                blocks.append(flat if mat is None else flat @ mat.double().numpy())
    return np.concatenate(blocks, axis=1)


@pytest.mark.parametrize("name", ["resnet", "resnet-batch", "vit", "factory"])
def test_kronecker_features_agree_with_the_exact_gradients(digits, name):
    """With every factor the identity the Kronecker path gives the exact gradients (tensor groups keep the vmap
    order); projected, it equals the explicit Kronecker projection of the exact gradients. Layers it does not
    hook (BatchNorm, the attention's packed input projection, tokens, a raw scale) take the vmap fallback."""
    model, config = model_of(name, digits)
    x, ids, y = batch(digits, config)
    ref = autograd_grads(model, "margin", x, y)
    objective = ClassifierObjective("margin")
    exact, groups = build_featurizer(model, objective, FeatureSpec(groups="tensor", projection="kronecker",
                                                                   total_dim=10 ** 7), ADAPTER.group_key)
    got = exact.features(x, ids, y)
    want = np.concatenate([ref[p] for g in groups for p in g.params], axis=1)
    assert rel(got, want) <= 1e-5
    fallback = {"resnet": [], "resnet-batch": ["bn", "downsample.1"],
                "vit": ["class_token", "pos_embedding", "in_proj"], "factory": ["scale"]}[name]
    assert all(any(f in p for f in fallback) for p in exact.vmap_params) and bool(exact.vmap_params) == bool(fallback)
    projected, _ = build_featurizer(model, objective, FeatureSpec(groups="block", projection="kronecker",
                                                                  total_dim=96, projection_seed=2), ADAPTER.group_key)
    assert not all(projected.projector.is_exact(j) for j in range(len(projected.groups)))
    assert rel(projected.features(x, ids, y), explicit_kronecker(projected.projector, ref)) <= 1e-5


def test_kronecker_refuses_torchs_own_attention(digits):
    """nn.MultiheadAttention's forward uses out_proj's weight without calling out_proj (torchvision's ViT calls it so):
    the Kronecker featurizer's check sees that the features do not add up and refuses in one line."""
    model, config = model_of("factory-attention", digits)
    x, ids, y = batch(digits, config)
    fz, _ = build_featurizer(model, ClassifierObjective("margin"), FeatureSpec(groups="block", projection="kronecker",
                                                                              total_dim=64), ADAPTER.group_key)
    with pytest.raises(UserError, match=r"attention.out_proj.weight do not add up .* use --projection rademacher"):
        fz.features(x, ids, y)


def test_batch_total_is_the_sum_of_the_examples_outputs(digits):
    model, config = model_of("vit", digits)
    x, ids, y = batch(digits, config)
    for name in ("margin", "loss"):
        objective = ClassifierObjective(name)
        with torch.no_grad():
            total = objective.batch_total(model, x, ids, y)
            each = [objective.example_output(model, x[i], torch.as_tensor(y[i])) for i in range(B)]
        torch.testing.assert_close(total, torch.stack(each).sum(), rtol=1e-5, atol=1e-6)
