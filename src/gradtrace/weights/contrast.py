"""An aspect statistic per parameter group from the learning queries' own values (no labels on the training data).

Learning queries generated with known values (the tokens or prompt values they were sampled with) give, for an
aspect A, positive pairs (q, q'): the same value of A and no other value in common; and negative pairs: different
values of A and at least one other value in common. For group j, with c_j(q, ·) the group's contributions of query
q over the training rows (all of them, or a fixed seeded subsample of `max_rows`) and z_j(q) = c_j(q, ·) / ‖c_j(q, ·)‖₂:

    S_j = mean_{(q, q') positive} ⟨z_j(q), z_j(q')⟩ − mean_{(q, q') negative} ⟨z_j(q), z_j(q')⟩

S_j > 0: group j ranks the training rows alike for queries that share A's value, more than for queries that share
another aspect's value. The weights (fixed form, chosen before any evaluation):

    w_j ∝ b_j · max(S_j, 0)        (b: base weights, e.g. the general SNR weights; w = b if no S_j > 0)

One statistic per group, averaged over pairs: nothing is optimised jointly over the groups, so the statistic
cannot fit M weights to Q queries the way a joint objective can.
"""
from __future__ import annotations

import numpy as np

from gradtrace.errors import UserError
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.learn import WeightsResult

DEFAULT_MAX_ROWS = 4096


def contrast_pairs(values: dict, aspect: str) -> tuple[np.ndarray, np.ndarray]:
    """(positive pairs (P, 2), negative pairs (R, 2)) of query indices q < q' from `values` (column -> one value per
    query, None = not set). A set value is shared when both queries have it and it is equal."""
    if aspect not in values:
        raise UserError(f"the learning queries carry no value for '{aspect}' (they have {', '.join(values)}); "
                        "generate them with that attribute set, or pass its values")
    cols = [np.asarray([None if v is None else str(v) for v in values[c]], dtype=object) for c in values]
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise UserError("every value column needs one value per learning query")

    def shared(col):
        set_ = np.array([v is not None for v in col])
        return (col[:, None] == col[None, :]) & set_[:, None] & set_[None, :]

    a = list(values).index(aspect)
    same_a = shared(cols[a])
    both_a = np.array([v is not None for v in cols[a]])
    diff_a = both_a[:, None] & both_a[None, :] & ~same_a
    others = np.zeros((n, n), dtype=bool)
    for i, col in enumerate(cols):
        if i != a:
            others |= shared(col)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    pos = np.argwhere(same_a & ~others & upper)
    neg = np.argwhere(diff_a & others & upper)
    if len(pos) == 0 or len(neg) == 0:
        raise UserError(f"the contrast statistic for '{aspect}' needs learning queries that share its value with no "
                        f"other value in common ({len(pos)} such pairs) and queries that differ in it but share "
                        f"another value ({len(neg)}); generate more learning queries with every attribute set")
    return pos, neg


def group_contrast(contrib: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """S (M,) above from contributions (Q, N, M) and the pairs of `contrast_pairs`."""
    c = np.asarray(contrib, dtype=np.float64)
    norm = np.linalg.norm(c, axis=1, keepdims=True)
    z = c / np.where(norm > 0, norm, 1.0)
    gram = np.einsum("qnm,pnm->qpm", z, z)
    return gram[pos[:, 0], pos[:, 1]].mean(axis=0) - gram[neg[:, 0], neg[:, 1]].mean(axis=0)


def contrast_weights(stat: np.ndarray, base: np.ndarray) -> np.ndarray:
    """w ∝ base · max(S, 0) on the simplex; the (normalised) base where no group has S > 0."""
    base = np.asarray(base, dtype=np.float64)
    w = base * np.maximum(np.asarray(stat, dtype=np.float64), 0.0)
    if not np.isfinite(w).all() or w.sum() <= 0:
        w = base
    return w / w.sum()


def sampled_contributions(fitted: FittedMethod, phi_q: np.ndarray, max_rows: int, seed: int) -> tuple:
    """((Q, R, M) contributions over R = min(N, max_rows) training rows, the rows): every row when N <= max_rows,
    else a sorted seeded sample."""
    n = fitted.n_train
    rows = np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    x = np.asarray(fitted.psi[rows], dtype=np.float64)
    out = np.empty((phi_q.shape[0], len(rows), fitted.n_groups), dtype=np.float64)
    for j, (_, s, e) in enumerate(fitted.group_slices):
        out[:, :, j] = phi_q[:, s:e] @ x[:, s:e].T
    return out, rows


def learn_contrast_weights(fitted: FittedMethod, query_features, values: dict, aspect: str, base_weights, *,
                           max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0) -> WeightsResult:
    """Weights for `aspect` from the contrast statistic of the learning queries (`values`: column -> the value each
    query was sampled with) over `base_weights` (the general weights of the same queries)."""
    phi_q = np.asarray(query_features, dtype=np.float64)
    base = np.asarray(base_weights, dtype=np.float64)
    if base.shape != (fitted.n_groups,) or (base < 0).any() or base.sum() <= 0:
        raise UserError(f"base weights must be {fitted.n_groups} non-negative numbers, not all zero")
    if any(len(v) != len(phi_q) for v in values.values()):
        raise UserError(f"give one value per learning query ({len(phi_q)}) in every column")
    pos, neg = contrast_pairs(values, aspect)
    contrib, rows = sampled_contributions(fitted, phi_q, int(max_rows), int(seed))
    stat = group_contrast(contrib, pos, neg)
    weights = contrast_weights(stat, base)
    info = {"objective": "contrast", "aspect": aspect, "k": None, "steps": 0, "seed": int(seed),
            "Q": int(len(phi_q)), "N": int(len(rows)), "M": int(fitted.n_groups), "path": "contrast",
            "pairs": {"positive": int(len(pos)), "negative": int(len(neg))}, "max_rows": int(max_rows),
            "statistic": stat.tolist(), "positive_groups": int((stat > 0).sum())}
    return WeightsResult(weights=weights, theta=np.log(np.maximum(weights, 1e-300)), group_names=fitted.group_names,
                         loss_curve=[], info=info)
