"""Detection metrics (mislabel detection): ROC AUC, the fraction found in the top of a ranking, and a paired
bootstrap over the ranked examples. The flips and the self-influence they rank: `gradtrace.evaluate.flips`.

    roc_auc(scores, flipped), top_found(scores, flipped, 0.1)
    detection_table({"uniform": s_u, "learned": s_l}, flipped, baseline="uniform")
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from gradtrace.choices import TOP_FRACTION, check_fraction  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.metrics.stats import N_BOOTSTRAP, percentile_ci


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve of `scores` for the `positive` (bool) examples: the Mann–Whitney probability that a
    positive outscores a negative, ties counted one half."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError("the ROC AUC needs both flipped and clean examples")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_count(n: int, fraction: float = TOP_FRACTION) -> int:
    """How many examples the top `fraction` of n holds: round(fraction · n), at least 1."""
    return max(1, int(round(check_fraction(fraction, "--top-fraction") * n)))


def top_found(scores, positive, fraction: float = TOP_FRACTION) -> float:
    """The fraction of positives among the top_count(N, fraction) highest scores (ties: the lower index first)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any():
        raise UserError("no flipped examples to find")
    top = np.argsort(-scores, kind="stable")[:top_count(len(scores), fraction)]
    return float(positive[top].sum() / positive.sum())


def _metrics(scores: np.ndarray, positive: np.ndarray, fraction: float) -> tuple[float, float]:
    return roc_auc(scores, positive), top_found(scores, positive, fraction)


def detection_table(scores: dict[str, np.ndarray], positive, *, baseline: str | None = None,
                    fraction: float = TOP_FRACTION, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0,
                    progress: bool = False) -> dict:
    """ROC AUC and top-`fraction` found of each named score vector, with bootstrap 95% CIs; and, against
    `baseline`, the paired differences (the same resampled training examples for both) with theirs.

    A replicate resamples the N training examples with replacement (generator seeded by `seed`); one without a
    flipped or without a clean example is drawn again."""
    positive = np.asarray(positive, dtype=bool)
    names = list(scores)
    if baseline is not None and baseline not in scores:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    point = {k: _metrics(v, positive, fraction) for k, v in arrays.items()}
    boot: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    rng = np.random.default_rng(int(seed))
    n = len(positive)
    for _ in tqdm(range(int(n_bootstrap)), desc="bootstrap", disable=not progress, leave=False):
        idx = rng.integers(0, n, size=n)
        while not positive[idx].any() or positive[idx].all():
            idx = rng.integers(0, n, size=n)
        for k in names:
            boot[k].append(_metrics(arrays[k][idx], positive[idx], fraction))
    table = {}
    for k in names:
        b = np.array(boot[k]).reshape(-1, 2)
        table[k] = {"auc": point[k][0], "auc_ci95": percentile_ci(b[:, 0].tolist()),
                    "top_found": point[k][1], "top_found_ci95": percentile_ci(b[:, 1].tolist())}
    paired = {}
    if baseline is not None:
        base = np.array(boot[baseline]).reshape(-1, 2)
        for k in names:
            if k == baseline:
                continue
            d = np.array(boot[k]).reshape(-1, 2) - base
            paired[f"{k} - {baseline}"] = {
                "auc": point[k][0] - point[baseline][0], "auc_ci95": percentile_ci(d[:, 0].tolist()),
                "top_found": point[k][1] - point[baseline][1], "top_found_ci95": percentile_ci(d[:, 1].tolist())}
    return {"n": int(n), "n_flipped": int(positive.sum()), "top_fraction": float(fraction),
            "top_count": top_count(n, fraction), "n_bootstrap": int(n_bootstrap), "bootstrap_seed": int(seed),
            "scores": table, "paired": paired}
