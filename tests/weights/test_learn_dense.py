"""The learner on a given contributions tensor (the entry point of base methods that give contributions directly,
EK-FAC) against the feature-store learner on the same contributions."""
from __future__ import annotations

import numpy as np
import pytest

from gradtrace.errors import UserError
from gradtrace.methods import get_method
from gradtrace.weights import dense_contributions, learn_weights, learn_weights_dense


@pytest.mark.parametrize("guard", ["none", "holdout"])
def test_dense_entry_point_learns_what_the_feature_learner_learns(guard):
    rng = np.random.default_rng(0)
    slices = [("a", 0, 3), ("b", 3, 7), ("c", 7, 9)]
    phi = rng.normal(size=(40, 9))
    phi[:5, 3:7] += 3.0  # a planted signal in group b
    queries = rng.normal(size=(16, 9))
    queries[:, 3:7] += 2.0
    fitted = get_method("trak", c=0.1).fit(phi, slices, progress=False)
    ref = learn_weights(fitted, queries, k=5, steps=30, guard=guard, progress=False)
    got = learn_weights_dense(dense_contributions(fitted, queries), ["a", "b", "c"], k=5, steps=30, guard=guard,
                              progress=False)
    assert ref.info["path"] == got.info["path"] == "dense"
    np.testing.assert_allclose(got.weights, ref.weights, rtol=1e-10)
    np.testing.assert_allclose(got.loss_curve, ref.loss_curve, rtol=1e-10)
    assert got.group_names == ["a", "b", "c"] and got.weights.argmax() == 1
    if guard == "holdout":
        assert got.info["guard"]["shrink"] == ref.info["guard"]["shrink"] > 0


def test_dense_entry_point_refuses_a_tensor_that_does_not_match_the_groups():
    with pytest.raises(UserError, match="3 groups"):
        learn_weights_dense(np.zeros((2, 5, 2)), ["a", "b", "c"], k=2, progress=False)
    with pytest.raises(UserError, match="larger than the training set"):
        learn_weights_dense(np.ones((2, 5, 3)), ["a", "b", "c"], k=6, progress=False)


def test_features_wider_than_the_learning_problem_take_the_dense_path(monkeypatch):
    """dim = 400 columns over 30 rows: ΨᵀΨ (400² floats) is larger than the dense (Q, N, M) tensor, so even a tiny
    memory budget takes the dense path (the scalable one would build the dim² Gram), with the reference result."""
    import gradtrace.weights.learn as learn_module

    rng = np.random.default_rng(3)
    slices = [(f"g{j}", 100 * j, 100 * (j + 1)) for j in range(4)]
    phi, queries = rng.normal(size=(30, 400)), rng.normal(size=(6, 400))
    fitted = get_method("trak", c=0.1, kernel="per-group").fit(phi, slices, progress=False)
    tiny = learn_weights(fitted, queries, k=3, steps=20, memory_budget_bytes=1, progress=False)
    ref = learn_weights_dense(dense_contributions(fitted, queries), [s[0] for s in slices], k=3, steps=20,
                              progress=False)
    assert tiny.info["path"] == "dense"
    np.testing.assert_allclose(tiny.weights, ref.weights, rtol=1e-10)
    monkeypatch.setattr(learn_module, "MAX_DENSE_BYTES", 100)  # beyond the cap: one line, not a dim² allocation
    with pytest.raises(UserError, match="project the gradients to fewer columns"):
        learn_weights(fitted, queries, k=3, steps=20, memory_budget_bytes=1, progress=False)
