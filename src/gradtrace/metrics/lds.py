"""The linear datamodeling score (LDS), per query, and its mean with a bootstrap 95% CI.

For query q, subsets S_1..S_S and the model output y_s(q) of the model retrained on S_s (averaged over
seeds; for the diffusion loss pass the NEGATIVE loss, a helpful training example lowers the loss):

    LDS(q) = spearman_s( Σ_{i ∈ S_s} τ(q, i),  y_s(q) )

A query whose outputs y_s(q) (or predictions) are all equal has no rank correlation: it is *undefined*,
kept as NaN per query, counted and named in the summary, and left out of the mean (never counted as 0).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import spearmanr

from gradtrace.errors import UserError
from gradtrace.metrics.stats import N_BOOTSTRAP, bootstrap_ci


def subset_mask(subsets: np.ndarray, train_ids) -> np.ndarray:
    """(S, N) bool: row s marks the training rows (in `train_ids` order) that subset s contains."""
    train_ids = np.asarray(train_ids, dtype=np.int64)
    subsets = np.asarray(subsets, dtype=np.int64)
    mask = np.stack([np.isin(train_ids, row) for row in subsets])
    short = np.nonzero(mask.sum(1) != subsets.shape[1])[0]
    if len(short):
        lost = np.setdiff1d(subsets[short[0]], train_ids)[:3].tolist()
        raise UserError(f"training features lack ids of subset {int(short[0])} (e.g. {lost}); featurize the "
                        "run's full training set")
    return mask


def subset_predictions(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S, Q) float64: Σ_{i ∈ S_s} τ(q, i) for scores (Q, N) and a subset mask (S, N)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != mask.shape[1]:
        raise UserError(f"scores must be (queries, {mask.shape[1]} training rows), got shape {scores.shape}")
    return mask.astype(np.float64) @ scores.T


def lds_per_query(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation per query between predictions (S, Q) and targets (S, Q); NaN = undefined."""
    predictions = np.asarray(predictions, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if predictions.shape != targets.shape or predictions.ndim != 2:
        raise UserError(f"predictions {predictions.shape} and targets {targets.shape} must both be (subsets, queries)")
    if predictions.shape[0] < 2:
        raise UserError("the LDS needs at least two subsets")
    out = np.full(predictions.shape[1], np.nan)
    for q in range(predictions.shape[1]):
        p, t = predictions[:, q], targets[:, q]
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
            continue
        if np.ptp(p) == 0 or np.ptp(t) == 0:
            continue
        out[q] = spearmanr(p, t).statistic
    return out


def undefined_reasons(predictions: np.ndarray, targets: np.ndarray) -> list[str | None]:
    """Why each query's LDS is undefined (None where it is defined)."""
    out: list[str | None] = []
    for p, t in zip(np.asarray(predictions, np.float64).T, np.asarray(targets, np.float64).T):
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
            out.append("non-finite predictions or model outputs")
        elif np.ptp(t) == 0:
            out.append("model outputs are equal for every subset")
        elif np.ptp(p) == 0:
            out.append("predictions are equal for every subset")
        else:
            out.append(None)
    return out


def summarize(per_query: np.ndarray, *, query_ids=None, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    """Mean over defined queries, percentile bootstrap 95% CI over queries (seeded), undefined counted."""
    per_query = np.asarray(per_query, dtype=np.float64)
    ids = np.arange(len(per_query)) if query_ids is None else np.asarray(query_ids)
    defined = np.isfinite(per_query)
    values = per_query[defined]
    n_undef = int((~defined).sum())
    doc = {"mean": None, "ci95": [None, None], "std": None, "n_queries": int(len(per_query)),
           "n_defined": int(defined.sum()), "n_undefined": n_undef,
           "undefined_query_ids": [int(i) for i in ids[~defined]],
           "bootstrap": {"n": int(n_bootstrap), "seed": int(seed), "over": "queries", "kind": "percentile"},
           "warning": None}
    if n_undef:
        doc["warning"] = (f"LDS undefined for {n_undef} of {len(per_query)} queries (model outputs or predictions "
                          "equal across subsets); left out of the mean")
    if len(values) == 0:
        doc["warning"] = f"LDS undefined for all {len(per_query)} queries; no mean"
        return doc
    doc["mean"] = float(values.mean())
    doc["std"] = float(values.std(ddof=1)) if len(values) > 1 else None
    if len(values) > 1:
        lo, hi = bootstrap_ci(values, n_bootstrap=n_bootstrap, seed=seed)
        doc["ci95"] = [lo, hi]
    return doc


def lds(scores: np.ndarray, mask: np.ndarray, targets: np.ndarray, *, query_ids=None, seed: int = 0,
        n_bootstrap: int = N_BOOTSTRAP) -> dict:
    """The whole LDS: scores (Q, N), subset mask (S, N), targets (S, Q) (e.g. −loss averaged over seeds)."""
    preds = subset_predictions(scores, mask)
    per_query = lds_per_query(preds, targets)
    summary = summarize(per_query, query_ids=query_ids, n_bootstrap=n_bootstrap, seed=seed)
    if summary["warning"]:
        warnings.warn(summary["warning"], stacklevel=2)
    summary["per_query"] = [None if not math.isfinite(v) else float(v) for v in per_query]
    summary["undefined_reasons"] = {int(i): r for i, r in zip(
        np.arange(len(per_query)) if query_ids is None else query_ids, undefined_reasons(preds, targets)) if r}
    return summary
