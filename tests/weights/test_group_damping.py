"""Per-group damping chosen without labels, against the streamed SNR objective of the kernel it picks."""
import numpy as np
import pytest

from gradtrace.errors import UserError
from gradtrace.methods import TRAK, lambda_grid
from gradtrace.weights import choose_lambda_scale
from gradtrace.weights.group_damping import choose_group_lambda_scales, snr_of_scores
from gradtrace.weights.streamed import snr_at

SLICES = [("a", 0, 6), ("b", 6, 16), ("c", 16, 40)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    scale = np.concatenate([np.full(6, 2.0), np.full(10, 0.5), np.full(24, 1.0)])
    phi = (rng.standard_normal((120, 40)) * scale).astype(np.float32)
    phi[:20] += phi[20:40]  # near-duplicates: a real top-k signal
    queries = (phi[40:52] + 0.3 * rng.standard_normal((12, 40)) * scale).astype(np.float32)
    return phi, queries


def test_chosen_per_group_c_give_the_reported_loss_never_above_the_global_one(data):
    phi, q = data
    c0, table = choose_lambda_scale(phi, SLICES, q, kernel="per-group", k=5)
    chosen, record = choose_group_lambda_scales(phi, SLICES, q, start_c=c0, k=5, sweeps=50)
    assert record["converged"] and record["moves"] > 0  # it moved: the check below is not trivial
    assert set(chosen) == {"a", "b", "c"} and all(c in lambda_grid() or c == c0 for c in chosen.values())
    # the start is the global choice: its loss is the grid table's entry at c0
    assert record["start_loss"] == pytest.approx(dict(table)[c0], rel=1e-6)
    # the reported loss is the streamed SNR objective of the kernel with those c_j (independent code path)
    fitted = TRAK(c=c0, kernel="per-group", group_c=chosen).fit(phi, SLICES)
    assert record["loss"] == pytest.approx(snr_at(fitted, q.astype(np.float64), 5), rel=1e-5)
    assert record["loss"] <= record["start_loss"]
    # and no single group's move from the result lowers the loss further (a coordinate-wise optimum)
    for name in chosen:
        for c in lambda_grid():
            trial = TRAK(c=c0, kernel="per-group", group_c={**chosen, name: c}).fit(phi, SLICES)
            assert snr_at(trial, q.astype(np.float64), 5) >= record["loss"] - 1e-9


def test_snr_of_scores_is_the_objective_definition():
    s = np.array([[3.0, 1.0, -2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    expected = (-(3.0 + 1.0) / 2 / np.linalg.norm(s[0]) + 0.0) / 2
    assert snr_of_scores(s, 2) == pytest.approx(expected)


def test_refuses_a_method_without_lambda_and_too_much_memory(data):
    phi, q = data
    with pytest.raises(UserError, match="no λ"):
        choose_group_lambda_scales(phi, SLICES, q, start_c=0.01, method="tracin")
    with pytest.raises(UserError, match="fewer learning queries"):
        choose_group_lambda_scales(phi, SLICES, q, start_c=0.01, max_bytes=1000)
