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


def label_relevance(query_labels: Any, train_labels: Any) -> np.ndarray:
    """(Q, N) bool: training item n carries query q's label value. A query label of None (not set: a null token,
    a missing metadata value) matches nothing, so that query's metrics are undefined; a training item without
    the label is never relevant. Labels compare as strings."""
    q = [None if v is None else str(v) for v in query_labels]
    t = [None if v is None else str(v) for v in train_labels]
    values = sorted({v for v in t if v is not None} | {v for v in q if v is not None})
    code = {v: i for i, v in enumerate(values)}
    return shared_value_relevance(np.array([code[v] if v is not None else -1 for v in q], dtype=np.int64),
                                  np.array([code[v] if v is not None else -2 for v in t], dtype=np.int64))


def bootstrap_mean(values: Any, *, n_bootstrap: int, seed: int = 0) -> dict:
    """{"mean", "ci95", "n_defined", "n_undefined"}: mean over the defined (finite) per-query values with a
    percentile bootstrap 95% CI over those queries (seeded); CI None with fewer than two defined values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(v)
    doc = {"mean": None, "ci95": [None, None], "n_defined": int(ok.sum()), "n_undefined": int((~ok).sum())}
    if ok.any():
        doc["mean"] = float(v[ok].mean())
    if ok.sum() > 1:
        doc["ci95"] = list(_percentile_ci(v[ok], n_bootstrap, seed))
    return doc


def paired_difference(a: Any, b: Any, *, n_bootstrap: int, seed: int = 0) -> dict:
    """mean(b − a) over the queries where both are defined, with a paired percentile bootstrap 95% CI over those
    queries (the same resampled queries for both), and a verdict: "higher" / "lower" when the CI excludes zero."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise UserError(f"paired values need the same queries, got {a.size} and {b.size}")
    doc = bootstrap_mean(np.where(np.isfinite(a) & np.isfinite(b), b - a, np.nan), n_bootstrap=n_bootstrap,
                         seed=seed)
    lo, hi = doc["ci95"]
    doc["verdict"] = ("higher" if lo is not None and lo > 0 else "lower" if hi is not None and hi < 0
                      else "no clear difference")
    return doc


def _percentile_ci(values: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float]:
    idx = np.random.default_rng(int(seed)).integers(0, len(values), size=(int(n_bootstrap), len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
