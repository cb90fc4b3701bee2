"""gradtrace.metrics.retrieval: Recall@k and AP against hand-computed examples and scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from gradtrace.errors import UserError
from gradtrace.metrics.retrieval import (
    average_precision,
    mean_average_precision,
    ranking,
    recall_at_k,
    retrieval_summary,
    shared_value_relevance,
)

# Two queries over 6 items. Query 0 ranks items 3,1,5,0,2,4 and items {1,2} are relevant:
# top-2 = {3,1} -> 1 hit / min(2, 2) = 0.5; top-4 = {3,1,5,0} -> 1 / 2 = 0.5.
# AP: relevant at ranks 2 (precision 1/2) and 5 (precision 2/5) -> (0.5 + 0.4) / 2 = 0.45.
# Query 1 ranks 0,1,2,3,4,5 and only item 0 is relevant: recall@2 = 1 / min(2, 1) = 1; AP = 1.
SCORES = np.array([[0.3, 0.8, 0.2, 0.9, 0.1, 0.5],
                   [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
RELEVANT = np.array([[False, True, True, False, False, False],
                     [True, False, False, False, False, False]])


def test_hand_computed_example():
    rec2 = recall_at_k(SCORES, RELEVANT, 2)
    np.testing.assert_allclose(rec2.values, [0.5, 1.0])
    assert rec2.mean == pytest.approx(0.75) and rec2.n_undefined == 0
    np.testing.assert_allclose(recall_at_k(SCORES, RELEVANT, 4).values, [0.5, 1.0])
    np.testing.assert_allclose(recall_at_k(SCORES, RELEVANT, 5).values, [1.0, 1.0])
    ap = average_precision(SCORES, RELEVANT)
    np.testing.assert_allclose(ap.values, [0.45, 1.0])
    assert mean_average_precision(SCORES, RELEVANT).mean == pytest.approx(0.725)
    np.testing.assert_array_equal(ranking(SCORES)[0], [3, 1, 5, 0, 2, 4])


def test_denominator_is_min_of_k_and_relevant_count():
    # 5 relevant of 8; top-3 holds 2 of them: 2 / min(3, 5) = 2/3; top-8 holds all 5: 5 / min(8, 5) = 1.
    scores = np.arange(8, 0, -1, dtype=float)  # ranking = 0..7
    rel = np.array([1, 0, 1, 1, 1, 0, 1, 0], dtype=bool)
    assert recall_at_k(scores, rel, 3).values[0] == pytest.approx(2 / 3)
    assert recall_at_k(scores, rel, 8).values[0] == pytest.approx(1.0)
    # AP by hand: hits at ranks 1,3,4,5,7 -> (1 + 2/3 + 3/4 + 4/5 + 5/7) / 5
    assert average_precision(scores, rel).values[0] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 7) / 5)


def test_average_precision_matches_sklearn_on_random_problems():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 300))
    rel = rng.random((20, 300)) < rng.uniform(0.02, 0.5, size=(20, 1))
    ours = average_precision(scores, rel)
    ref = np.array([average_precision_score(rel[q], scores[q]) for q in range(20)])
    np.testing.assert_allclose(ours.values, ref, rtol=1e-12)
    assert ours.mean == pytest.approx(ref.mean())


def test_recall_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(15, 100))
    rel = rng.random((15, 100)) < 0.1
    for k in (1, 5, 10, 40):
        ref = []
        for q in range(15):
            top = sorted(range(100), key=lambda n: -scores[q, n])[:k]
            ref.append(sum(rel[q, n] for n in top) / min(k, rel[q].sum()))
        np.testing.assert_allclose(recall_at_k(scores, rel, k).values, ref)


def test_queries_without_relevant_items_are_undefined_not_zero():
    rel = RELEVANT.copy()
    rel[1] = False
    rec = recall_at_k(SCORES, rel, 2)
    assert np.isnan(rec.values[1]) and rec.n_undefined == 1 and rec.n_defined == 1
    assert rec.mean == pytest.approx(0.5)  # the mean over defined queries only
    ap = average_precision(SCORES, rel)
    assert np.isnan(ap.values[1]) and ap.mean == pytest.approx(0.45)
    none = average_precision(SCORES, np.zeros_like(rel))
    assert none.n_undefined == 2 and np.isnan(none.mean) and none.as_dict()["mean"] is None


def test_ties_go_to_the_lower_index():
    scores = np.zeros((1, 4))
    rel = np.array([[False, False, True, True]])
    assert recall_at_k(scores, rel, 2).values[0] == 0.0
    assert average_precision(scores, rel).values[0] == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_shared_value_relevance_and_summary():
    rel = shared_value_relevance(np.array([0, 2, -1]), np.array([0, 1, 2, 0, -1]))
    np.testing.assert_array_equal(rel, [[1, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    summary = retrieval_summary(SCORES, RELEVANT, k=2)
    assert summary == {"recall_at_k": pytest.approx(0.75), "map": pytest.approx(0.725), "k": 2, "n_queries": 2,
                       "n_undefined": 0}


def test_bad_inputs_are_refused():
    with pytest.raises(UserError):
        recall_at_k(SCORES, RELEVANT[:, :3], 2)
    with pytest.raises(UserError):
        recall_at_k(SCORES, RELEVANT, 0)
    with pytest.raises(UserError):
        recall_at_k(SCORES, RELEVANT, 7)
    with pytest.raises(UserError):
        average_precision(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(UserError):
        average_precision(SCORES, RELEVANT.astype(int) * 2)


def test_label_relevance_matches_strings_and_leaves_unset_queries_undefined():
    from gradtrace.metrics.retrieval import label_relevance

    rel = label_relevance(["a", None, "b"], ["b", "a", None, "a"])
    np.testing.assert_array_equal(rel, [[False, True, False, True], [False] * 4, [True, False, False, False]])
    assert np.isnan(recall_at_k(np.arange(4.0)[None].repeat(3, 0), rel, 2).values[1])


def test_paired_difference_by_hand():
    from gradtrace.metrics.retrieval import bootstrap_mean, paired_difference

    a = np.array([0.1, 0.5, np.nan, 0.2, 0.4])
    b = np.array([0.3, 0.9, 0.7, 0.6, np.nan])
    d = paired_difference(a, b, n_bootstrap=500, seed=3)
    both = np.array([0.2, 0.4, 0.4])  # queries 0, 1, 3 are defined in both
    assert d["mean"] == pytest.approx(both.mean()) and d["n_defined"] == 3 and d["n_undefined"] == 2
    rng = np.random.default_rng(3)
    means = [both[row].mean() for row in rng.integers(0, 3, size=(500, 3))]
    assert d["ci95"] == pytest.approx([np.quantile(means, 0.025), np.quantile(means, 0.975)])
    assert d["verdict"] == "higher"  # every resample of these three positive differences is positive
    assert paired_difference(b, a, n_bootstrap=500, seed=3)["verdict"] == "lower"
    one = bootstrap_mean([0.5, np.nan], n_bootstrap=10)
    assert one["mean"] == 0.5 and one["ci95"] == [None, None]
