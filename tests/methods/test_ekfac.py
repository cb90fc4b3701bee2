"""EK-FAC (kronfluence as the engine): per-group contributions against kronfluence's own total score, a single
linear layer against EK-FAC written out in numpy, self-influence against the diagonal of pairwise scores, and
models EK-FAC cannot score refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradtrace.adapters.classifier.groups import block_key
from gradtrace.adapters.classifier.objective import ClassifierObjective
from gradtrace.data.sources import Examples
from gradtrace.errors import UserError
from gradtrace.features.groups import make_groups
from gradtrace.methods.ekfac import EkfacEngine, tracked_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def examples(n: int, shape, classes: int, seed: int, start: int = 0) -> Examples:
    g = torch.Generator().manual_seed(seed)
    return Examples(images=torch.randn(n, *shape, generator=g), ids=np.arange(start, start + n),
                    cond=torch.randint(0, classes, (n,), generator=g).numpy(), captions=[""] * n, source={})


class TinyNet(nn.Module):
    """Two conv layers, a norm (no EK-FAC score) and a head, named like a torchvision ResNet's parts."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.GroupNorm(1, 3)
        self.layer1 = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(self.layer1(torch.relu(self.bn1(self.conv1(x)))).flatten(1))


def engine(model, tmp_path, *, measurement="margin", groups="block", **kw) -> EkfacEngine:
    order = [g.name for g in make_groups(model, groups, preset_key=lambda p: block_key if p == "block" else None)]
    key = {p: g.name for g in make_groups(model, groups, preset_key=lambda p: block_key if p == "block" else None)
           for p in g.params}
    return EkfacEngine(model, ClassifierObjective("loss"), ClassifierObjective(measurement), key.__getitem__, order,
                       factors_dir=tmp_path / "factors", sign=1.0 if measurement == "loss" else -1.0, batch_size=16,
                       progress=False, **kw)


def test_group_contributions_sum_to_kronfluence_total(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    train, queries = examples(40, (1, 6, 6), 5, 1), examples(6, (1, 6, 6), 5, 2, start=100)
    eng = engine(model, tmp_path, dtype=torch.float64)
    eng.fit(train, identity={"test": 1})
    assert eng.group_names == ["stem", "layer1.0", "head"]  # the block preset: conv1, layer1.0.*, fc
    assert eng.untracked == ["bn1.bias", "bn1.weight"]
    contrib = eng.contributions(queries, train, c=0.1)
    total = eng.total(queries, train, c=0.1)
    assert contrib.shape == (6, 40, 3)
    np.testing.assert_allclose(contrib.sum(-1), total, rtol=1e-9, atol=1e-9 * np.abs(total).max())
    assert np.abs(contrib).min(axis=(0, 1)).max() > 0  # every group carries its own part
    # uniform weights on the simplex (1/M each, the learner's start) give the total / M
    np.testing.assert_allclose(contrib @ np.full(3, 1 / 3), total / 3, rtol=1e-9, atol=1e-12)
    # the factors are reused for the same identity and refused for another one
    assert eng.fit(train, identity={"test": 1})["n_train"] == 40
    with pytest.raises(UserError, match="fitted for another"):
        eng.fit(train, identity={"test": 2})


def numpy_ekfac(w: np.ndarray, a_train, y_train, a_query, y_query, c: float) -> np.ndarray:
    """EK-FAC of one bias-free linear layer z = W a with cross-entropy (empirical Fisher), written out:
    A = E[a aᵀ], S = E[g gᵀ] (g = ∂loss/∂z), Λ = E[(Q_Sᵀ G Q_A)²] with G = g aᵀ, δ = c · mean Λ, and the score
    −⟨Q_S ((Q_Sᵀ G_q Q_A) / (Λ + δ)) Q_Aᵀ, G_n⟩ with G_q the margin gradient (higher is better: negated)."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    z = a_train @ w.T
    g = softmax(z) - np.eye(w.shape[0])[y_train]                     # (N, C) ∂CE/∂z
    a_cov, s_cov = a_train.T @ a_train / len(a_train), g.T @ g / len(g)
    _, qa = np.linalg.eigh(a_cov)
    _, qs = np.linalg.eigh(s_cov)
    grads = np.einsum("nc,nd->ncd", g, a_train)                       # per-example ∂CE/∂W
    rot = np.einsum("ci,ncd,dj->nij", qs, grads, qa)
    lam = (rot ** 2).mean(0)
    zq = a_query @ w.T
    yq = np.eye(w.shape[0])[y_query]
    others = np.where(yq > 0, -np.inf, zq)
    dm = yq - softmax(others) * (1 - yq)                              # ∂margin/∂z
    gq = np.einsum("qc,qd->qcd", dm, a_query)
    pre = np.einsum("ci,qcd,dj->qij", qs, gq, qa) / (lam + c * lam.mean())
    pre = np.einsum("ci,qij,dj->qcd", qs, pre, qa)
    return -np.einsum("qcd,ncd->qn", pre, grads)


def test_single_linear_layer_matches_ekfac_written_out(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4, bias=False))
    train, queries = examples(50, (6,), 4, 4), examples(5, (6,), 4, 5, start=100)
    eng = engine(model, tmp_path, groups="module", dtype=torch.float64, empirical_fisher=True)
    eng.fit(train, identity={})
    got = eng.contributions(queries, train, c=0.05)
    assert got.shape == (5, 50, 1)
    w = model[1].weight.detach().double().numpy()
    want = numpy_ekfac(w, train.images.double().numpy(), train.cond, queries.images.double().numpy(), queries.cond,
                       0.05)
    np.testing.assert_allclose(got[..., 0], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_self_influence_per_group_is_the_diagonal_of_pairwise_loss_scores(tmp_path):
    torch.manual_seed(1)
    model = TinyNet()
    train = examples(24, (1, 6, 6), 5, 6)
    eng = engine(model, tmp_path, measurement="loss", dtype=torch.float64)
    eng.fit(train, identity={})
    self_c = eng.self_contributions(train, c=0.1)
    pair = eng.contributions(train, train, c=0.1)
    assert self_c.shape == (24, 3)
    np.testing.assert_allclose(self_c, np.einsum("nnm->nm", pair), rtol=1e-8, atol=1e-10 * np.abs(self_c).max())
    assert (self_c.sum(1) > 0).all()


def test_models_without_linear_or_conv_layers_are_refused(tmp_path):
    class NormOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x)

    with pytest.raises(UserError, match="no linear or convolution layer"):
        engine(NormOnly(), tmp_path)
    attention = nn.Module()
    attention.attn = nn.MultiheadAttention(4, 2)
    attention.head = nn.Linear(4, 2)
    assert tracked_modules(attention) == ["head"]  # out_proj is never called through its forward
    with pytest.raises(UserError, match="apart"):
        engine(TinyNet(), tmp_path, groups="conv1=conv1.weight;fc=fc")


class Twice(ClassifierObjective):
    """Each example fed as two identical rows (example-major), its output the mean of the two: like a diffusion
    objective's repeats over timesteps."""

    def batch_total(self, model, inputs, ids, cond):
        x, y = self._batch(inputs, cond)
        return ClassifierObjective.batch_total(self, model, x.repeat_interleave(2, 0), ids,
                                               y.repeat_interleave(2, 0).numpy()) / 2


def test_repeated_rows_are_summed_per_example(tmp_path):
    """Rows g/2 of each example: the curvature, Λ and the damping scale by 1/4, and the 2 x 2 block of row scores
    sums to 4 (g_q/2)ᵀ (G/4 + δ/4)⁻¹ (g_n/2) = 4 g_qᵀ (G + δ)⁻¹ g_n — four times the plain score."""
    torch.manual_seed(2)
    model = TinyNet()
    train, queries = examples(20, (1, 6, 6), 5, 7), examples(4, (1, 6, 6), 5, 8, start=100)
    names = ["stem", "layer1.0", "head"]
    key = {"conv1": "stem", "layer1": "layer1.0", "fc": "head"}
    results = []
    for i, kind in enumerate((ClassifierObjective, Twice)):
        eng = EkfacEngine(model if i == 0 else TinyNet(), kind("loss"), kind("margin"),
                          lambda p: key[p.split(".")[0]], names, factors_dir=tmp_path / f"f{i}", sign=-1.0,
                          batch_size=8, progress=False, dtype=torch.float64, empirical_fisher=True)
        if i == 1:
            eng.model.load_state_dict(results[0][1])
        eng.fit(train, identity={})
        results.append((eng.contributions(queries, train, c=0.1), eng.model.state_dict()))
    np.testing.assert_allclose(results[1][0], 4 * results[0][0], rtol=1e-8, atol=1e-10 * np.abs(results[0][0]).max())
