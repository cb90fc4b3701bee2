"""Confidence intervals by the percentile bootstrap, for every metric and benchmark.

    lo, hi = bootstrap_ci(per_query_lds, n_bootstrap=1000, seed=0)     # 95% CI of the mean over queries
    lo, hi = paired_ci(recall_learned, recall_uniform, 2000)           # 95% CI of mean(a − b), paired per query
    lo, hi = percentile_ci(replicates)                                 # 2.5th and 97.5th percentiles
    mean_ci(deltas, seed=0)                                            # {"mean", "ci95"} of per-query values

A replicate resamples the values with replacement from a generator seeded by `seed`, so the same values and seed
give the same interval.
"""
from __future__ import annotations

import numpy as np

from gradtrace.choices import N_BOOTSTRAP  # noqa: F401  (the CLI's choices)


def bootstrap_ci(values: np.ndarray, *, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample `values` with replacement `n_bootstrap` times."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(int(seed))
    idx = rng.integers(0, len(values), size=(int(n_bootstrap), len(values)))
    means = values[idx].mean(1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> list[float]:
    """95% bootstrap CI over queries of mean(a − b) (paired: one resample of the queries serves both)."""
    d = np.asarray(a) - np.asarray(b)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def percentile_ci(replicates) -> list[float | None]:
    """The 2.5th and 97.5th percentiles of bootstrap replicates ([None, None] below two replicates)."""
    if len(replicates) < 2:
        return [None, None]
    return [float(np.percentile(replicates, 2.5)), float(np.percentile(replicates, 97.5))]


def mean_ci(values: np.ndarray, seed: int = 0) -> dict:
    """{"mean", "ci95"} of per-query values (tail-patch and counterfactual deltas): the bootstrap CI of the mean,
    [None, None] for a single value."""
    values = np.asarray(values)
    ci = bootstrap_ci(values, seed=seed) if len(values) > 1 else (None, None)
    return {"mean": float(values.mean()), "ci95": list(ci)}
