"""Retrieval metrics where ground truth is known: Recall@k and (mean) average precision.

Every metric takes a score matrix (Q, N) (higher = more relevant) and a boolean relevance matrix (Q, N) and
returns a `PerQuery`: the value for each query, their mean over the queries where it is defined, and how
many queries were undefined. A query with no relevant item has no recall and no AP: it is reported as NaN
and counted in `n_undefined`, never as 0 (a 0 would mix "nothing to find" with "found nothing").

Ranking: descending score; equal scores keep the lower column index first (a stable sort, the same tie rule
as `FittedMethod.topk`). With distinct scores the AP equals scikit-learn's `average_precision_score`.

    Recall@k(q) = |top-k(q) ∩ R(q)| / min(k, |R(q)|)
    AP(q)       = (1 / |R(q)|) Σ_{r : item at rank r ∈ R(q)} precision@r
    mAP         = mean over defined queries of AP(q)

    relevant = shared_value_relevance(query_codes[:, a], train_codes[:, a])   # same value of attribute a
    recall_at_k(scores, relevant, 10).mean, mean_average_precision(scores, relevant).mean
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradtrace.errors import UserError


@dataclass
class PerQuery:
    """A metric per query (NaN where undefined), the mean over defined queries, and the undefined count."""

    values: np.ndarray
    mean: float
    n_undefined: int

    @property
    def n_defined(self) -> int:
        return int(self.values.size - self.n_undefined)

    def as_dict(self) -> dict:
        return {"mean": None if np.isnan(self.mean) else float(self.mean), "n_queries": int(self.values.size),
                "n_undefined": int(self.n_undefined)}


def _per_query(values: np.ndarray) -> PerQuery:
    undefined = int(np.isnan(values).sum())
    mean = float(np.mean(values[~np.isnan(values)])) if undefined < values.size else float("nan")
    return PerQuery(values=values, mean=mean, n_undefined=undefined)


def _check(scores: Any, relevant: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(relevant)
    if s.ndim == 1:
        s = s[None, :]
    if r.ndim == 1:
        r = r[None, :]
    if s.ndim != 2 or s.shape != r.shape:
        raise UserError(f"scores and relevant must both be (Q, N) with the same shape, got {np.shape(scores)} "
                        f"and {np.shape(relevant)}")
    if s.shape[1] == 0:
        raise UserError("scores have no columns (no training items to rank); pass N >= 1")
    if r.dtype != bool:
        if not np.isin(r, (0, 1)).all():
            raise UserError("relevant must be boolean (or 0/1) per (query, item); got other values")
        r = r.astype(bool)
    if not np.isfinite(s).all():
        raise UserError("scores contain NaN or inf; fix the scores before ranking")
    return s, r


def ranking(scores: Any) -> np.ndarray:
    """(Q, N) column indices by descending score, ties to the lower index."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[None, :] if s.ndim == 1 else s
    return np.argsort(-s, axis=1, kind="stable")


def recall_at_k(scores: Any, relevant: Any, k: int) -> PerQuery:
    """Per query |top-k ∩ relevant| / min(k, |relevant|); NaN (undefined) where nothing is relevant."""
    s, r = _check(scores, relevant)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > s.shape[1]:
        raise UserError(f"k must be an integer in 1..{s.shape[1]} (the number of items), got {k!r}")
    top = ranking(s)[:, :int(k)]
    hits = np.take_along_axis(r, top, axis=1).sum(axis=1).astype(np.float64)
    n_rel = r.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(n_rel > 0, hits / np.minimum(int(k), n_rel), np.nan)
    return _per_query(values)


def average_precision(scores: Any, relevant: Any) -> PerQuery:
    """Per query AP over the full ranking; NaN (undefined) where nothing is relevant."""
    s, r = _check(scores, relevant)
    rel_sorted = np.take_along_axis(r, ranking(s), axis=1).astype(np.float64)
    precision = np.cumsum(rel_sorted, axis=1) / np.arange(1, s.shape[1] + 1)
    n_rel = rel_sorted.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(n_rel > 0, (precision * rel_sorted).sum(axis=1) / n_rel, np.nan)
    return _per_query(values)


def mean_average_precision(scores: Any, relevant: Any) -> PerQuery:
    """The same per-query AP as `average_precision`; `.mean` is the mAP over queries where AP is defined."""
    return average_precision(scores, relevant)


def shared_value_relevance(query_values: Any, train_values: Any, *, null: int = -1) -> np.ndarray:
    """(Q, N) bool: training item n shares query q's value; a null query value (-1) matches nothing."""
    q = np.asarray(query_values).reshape(-1)
    t = np.asarray(train_values).reshape(-1)
    return (q[:, None] == t[None, :]) & (q[:, None] != null)


def retrieval_summary(scores: Any, relevant: Any, k: int = 10) -> dict:
    """{"recall_at_k", "map", "k", "n_queries", "n_undefined"} with the means over defined queries."""
    rec = recall_at_k(scores, relevant, k)
    ap = average_precision(scores, relevant)
    return {"recall_at_k": rec.as_dict()["mean"], "map": ap.as_dict()["mean"], "k": int(k),
            "n_queries": int(rec.values.size), "n_undefined": rec.n_undefined}
