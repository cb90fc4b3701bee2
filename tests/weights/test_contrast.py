"""The contrast statistic: pairs and S_j against plain loops, the weights' form, the row subsample, and a planted case
(a group whose rankings follow one aspect gets the weight for that aspect)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from gradtrace.errors import UserError
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.contrast import (
    contrast_pairs,
    contrast_weights,
    group_contrast,
    learn_contrast_weights,
    sampled_contributions,
)

VALUES = {"subject": ["a", "a", "b", "b", "a", "c", None],
          "style": ["x", "y", "x", "y", "x", "y", "x"],
          "background": ["p", "q", "q", "p", "p", None, "q"]}


def _pairs_by_hand(values, aspect):
    cols = list(values)
    n = len(values[aspect])
    pos, neg = [], []
    for q, r in itertools.combinations(range(n), 2):
        va, vb = values[aspect][q], values[aspect][r]
        share_other = any(values[c][q] is not None and values[c][q] == values[c][r] for c in cols if c != aspect)
        if va is not None and va == vb and not share_other:
            pos.append((q, r))
        if va is not None and vb is not None and va != vb and share_other:
            neg.append((q, r))
    return pos, neg


@pytest.mark.parametrize("aspect", ["subject", "style", "background"])
def test_pairs_match_a_plain_loop(aspect):
    pos, neg = contrast_pairs(VALUES, aspect)
    want_pos, want_neg = _pairs_by_hand(VALUES, aspect)
    assert [tuple(p) for p in pos.tolist()] == want_pos
    assert [tuple(p) for p in neg.tolist()] == want_neg


def test_statistic_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    contrib = rng.normal(size=(7, 15, 4))
    contrib[2, :, 3] = 0.0  # a zero row: its cosines are 0
    pos, neg = contrast_pairs(VALUES, "subject")
    got = group_contrast(contrib, pos, neg)
    for j in range(4):
        def cos(q, r):
            a, b = contrib[q, :, j], contrib[r, :, j]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))
        want = np.mean([cos(q, r) for q, r in pos]) - np.mean([cos(q, r) for q, r in neg])
        assert got[j] == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_weights_form():
    base = np.array([0.1, 0.2, 0.3, 0.4])
    w = contrast_weights(np.array([0.5, -0.2, 0.0, 0.25]), base)
    want = np.array([0.05, 0.0, 0.0, 0.1]) / 0.15
    np.testing.assert_allclose(w, want, rtol=1e-12)
    np.testing.assert_allclose(contrast_weights(np.array([-1.0, -2.0, 0.0, -0.1]), base), base, rtol=1e-12)


def test_subsample_rows_are_a_seeded_subset():
    rng = np.random.default_rng(2)
    psi, phi = rng.normal(size=(50, 6)), rng.normal(size=(3, 6))
    fitted = FittedMethod(psi=psi, group_slices=[("g0", 0, 2), ("g1", 2, 6)], info={})
    full, rows = sampled_contributions(fitted, phi, 100, 0)
    assert rows.tolist() == list(range(50))
    np.testing.assert_allclose(full[:, :, 0], phi[:, :2] @ psi[:, :2].T, rtol=1e-12)
    np.testing.assert_allclose(full[:, :, 1], phi[:, 2:] @ psi[:, 2:].T, rtol=1e-12)
    part, rows2 = sampled_contributions(fitted, phi, 20, 5)
    again, rows3 = sampled_contributions(fitted, phi, 20, 5)
    assert len(rows2) == 20 and rows2.tolist() == rows3.tolist() and list(rows2) == sorted(set(rows2.tolist()))
    np.testing.assert_allclose(part, full[:, rows2], rtol=1e-12)
    np.testing.assert_array_equal(part, again)


def test_planted_group_follows_its_aspect():
    """Group 0's features encode the subject, group 1's the style: subject weights move to group 0, style to 1."""
    rng = np.random.default_rng(3)
    subjects, styles = ["a", "b", "c"], ["x", "y", "z"]
    codes = [(s, t) for s in range(3) for t in range(3)] * 2
    proto = rng.normal(size=(2, 3, 8))
    phi = np.array([np.concatenate([proto[0, s], proto[1, t]]) for s, t in codes]) + 0.05 * rng.normal(size=(18, 16))
    psi = rng.normal(size=(200, 16))
    fitted = FittedMethod(psi=psi, group_slices=[("subj", 0, 8), ("sty", 8, 16)], info={})
    values = {"subject": [subjects[s] for s, _ in codes], "style": [styles[t] for _, t in codes]}
    base = np.array([0.5, 0.5])
    ws = learn_contrast_weights(fitted, phi, values, "subject", base)
    wt = learn_contrast_weights(fitted, phi, values, "style", base)
    assert ws.weights[0] > 0.99 and wt.weights[1] > 0.99
    assert ws.info["statistic"][0] > 0 > ws.info["statistic"][1]


def test_bad_input():
    with pytest.raises(UserError, match="no value for 'colour'"):
        contrast_pairs(VALUES, "colour")
    with pytest.raises(UserError, match="needs learning queries"):
        contrast_pairs({"subject": ["a", "a"], "style": ["x", "x"]}, "subject")
    fitted = FittedMethod(psi=np.ones((4, 2)), group_slices=[("g0", 0, 1), ("g1", 1, 2)], info={})
    with pytest.raises(UserError, match="base weights"):
        learn_contrast_weights(fitted, np.ones((2, 2)), {"subject": ["a", "b"]}, "subject", np.array([1.0]))
