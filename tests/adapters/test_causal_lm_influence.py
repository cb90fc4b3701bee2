"""EK-FAC (kronfluence) on causal LMs through the adapter's influence model: GPT-2's Conv1D layers as nn.Linear give
the same logits and loss (full model and LoRA); kronfluence's activation covariance of a layer equals the one summed
by hand over the real tokens only (padding never enters the curvature); with a damping much larger than the
curvature the per-group scores are the per-group gradient dot products of the original model divided by the damping
(a plain autograd loop); and the per-group contributions add up to kronfluence's own total score."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.lms import source_of, tiny_lm_with_texts
from gradtrace.adapters import get_adapter
from gradtrace.adapters.base import Checkpoint
from gradtrace.adapters.causal_lm.objective import LMObjective
from gradtrace.data import load_dataset
from gradtrace.features.groups import make_groups
from gradtrace.methods.ekfac import FACTORS, EkfacEngine

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = get_adapter("causal-lm")
SEQ = 32


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm_with_texts(tmp_path_factory.mktemp("lm-influence"), 24)


def model_of(lm, lora: int | None = None):
    folder, data = lm
    config = ADAPTER.default_model_config(load_dataset(data), base=folder, lora_rank=lora,
                                         model_options={"seq_len": SEQ})
    model = ADAPTER.build(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the initialisation (LoRA's B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, config


def checkpoint(model) -> Checkpoint:
    return Checkpoint(model=model, config={"model_config": model.config}, fingerprint="test", path=None)


def engine_for(model, folder) -> EkfacEngine:
    twin = ADAPTER.influence_model(checkpoint(model))
    groups = make_groups(twin, "block", preset_key=ADAPTER.group_key, adapter_presets=ADAPTER.group_presets)
    key = {p: g.name for g in groups for p in g.params}
    return EkfacEngine(twin, LMObjective("loss"), LMObjective("loss"), key.__getitem__, [g.name for g in groups],
                       factors_dir=folder, batch_size=5, progress=False)


@pytest.mark.parametrize("lora", [None, 2])
def test_the_linear_twin_computes_the_same_logits_and_loss(lm, lora):
    model, config = model_of(lm, lora)
    twin = ADAPTER.influence_model(checkpoint(model))
    convs = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(convs) == 8  # c_attn, c_proj, c_fc, c_proj per block
    for name in convs:
        kind = type(twin.get_submodule(name)).__name__
        assert kind == ("Conv1D" if lora else "Linear")  # LoRA's frozen base layers stay; its factors are Linear
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    ex = ADAPTER.examples(config, source_of(lm[1]), ids=np.arange(4))
    with torch.no_grad():
        np.testing.assert_allclose(twin(ex.images).numpy(), model(ex.images).numpy(), rtol=1e-4, atol=1e-5)
        objective = LMObjective("loss")
        assert float(objective.batch_total(twin, ex.images, ex.ids, ex.cond)) == pytest.approx(
            float(objective.batch_total(model, ex.images, ex.ids, ex.cond)), rel=1e-5)
    assert type(model.get_submodule(convs[0])).__name__ == "Conv1D"  # the checkpoint's model is untouched


def test_padding_never_enters_the_curvature(lm, tmp_path):
    model, config = model_of(lm)
    train = ADAPTER.examples(config, source_of(lm[1]), ids=np.arange(10))
    assert train.cond.min() < SEQ  # padding present
    engine = engine_for(model, tmp_path / "f")
    engine.fit(train, identity={"test": 1})
    layer = "lm.transformer.h.0.mlp.c_fc"
    rows = []
    hook = model.get_submodule(layer).register_forward_hook(lambda m, a, out: rows.append(a[0].detach()))
    with torch.no_grad():
        model(train.images)
    hook.remove()
    x = torch.cat([rows[0][b, :int(n)] for b, n in enumerate(train.cond)]).double()  # real tokens only
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)                    # the bias column
    cov = engine.analyzer.load_covariance_matrices(FACTORS)
    assert int(cov["num_activation_covariance_processed"][layer]) == int(train.cond.sum())
    got = cov["activation_covariance"][layer].double().numpy()
    np.testing.assert_allclose(got, (x.T @ x).numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(got).max()))


def gradient_dots(model, module_group: dict, names: list[str], queries, train) -> np.ndarray:
    """(Q, N, M): Σ over each group's tracked modules (weight and bias) of ∇f(q) · ∇L(n), by autograd on the
    original model, one sequence at a time."""
    params = dict(model.named_parameters())
    tracked = [(f"{m}.{t}", names.index(g)) for m, g in module_group.items() for t in ("weight", "bias")
               if f"{m}.{t}" in params]
    objective = LMObjective("loss")

    def grads(ex):
        out = []
        for r in range(len(ex.ids)):
            one = ex.take([r])
            g = torch.autograd.grad(objective.batch_total(model, one.images, one.ids, one.cond),
                                    [params[n] for n, _ in tracked])
            out.append([t.double().reshape(-1) for t in g])
        return out

    gq, gn = grads(queries), grads(train)
    dots = np.zeros((len(gq), len(gn), len(names)))
    for i, a in enumerate(gq):
        for j, b in enumerate(gn):
            for (_, group), u, v in zip(tracked, a, b):
                dots[i, j, group] += float(u @ v)
    return dots


@pytest.mark.parametrize("lora", [None, 2])
def test_scores_are_gradient_dots_under_heavy_damping_and_add_up_to_the_total(lm, tmp_path, lora):
    model, config = model_of(lm, lora)
    train = ADAPTER.examples(config, source_of(lm[1]), ids=np.arange(10))
    queries = ADAPTER.examples(config, source_of(lm[1]), ids=np.arange(18, 21))
    engine = engine_for(model, tmp_path / "f")
    engine.fit(train, identity={"test": 1})
    assert engine.group_names == ["block0.attn", "block0.mlp", "block1.attn", "block1.mlp"]
    assert not any("lm_head" in m for m in engine.module_group)  # tied to the token embedding: not scored
    if lora:
        assert all(".lora_" in m for m in engine.module_group) and len(engine.module_group) == 16
    else:
        assert "lm.transformer.wte.weight" in engine.untracked and len(engine.module_group) == 8
    c = 1e7
    got = engine.contributions(queries, train, c) * engine.damping(c)
    want = gradient_dots(model, engine.module_group, engine.group_names, queries, train)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    contrib = engine.contributions(queries, train, 0.1)
    total = engine.total(queries, train, 0.1)
    np.testing.assert_allclose(contrib.sum(-1), total, rtol=1e-4, atol=1e-5 * float(np.abs(total).max()))
