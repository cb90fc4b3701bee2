"""Mislabel detection, the parts that know no model: seeded label flips, self-influence, ROC AUC, the fraction
found in the top of the ranking, and a paired bootstrap over training examples.

    noisy, flipped = flip_labels(labels, num_classes, fraction=0.1, seed=0)
    per_group = bilinear_self_influence(fitted, train_features)      # (N, M): c_j(x_n, x_n) = φ_j(x_n) · ψ_j(x_n)
    scores = per_group @ w                                           # τ_w(x_n, x_n), weights on the query side
    roc_auc(scores, flipped), top_found(scores, flipped, 0.1)
    detection_table({"uniform": s_u, "learned": s_l}, flipped, baseline="uniform")

Self-influence is the diagonal of the Q×N score matrix with the training set as its own queries; only the diagonal
is computed (one rowwise dot product per group and row chunk), never the N×N matrix.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from gradtrace.choices import N_BOOTSTRAP, TOP_FRACTION, check_fraction  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.methods.rows import effective_chunk_rows, row_chunks


def flip_labels(labels, num_classes: int, *, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped (N,) bool): round(fraction·N) rows (at least 1) drawn without replacement from a
    generator seeded by `seed`, each given a class drawn uniformly from the num_classes − 1 others (never its own)."""
    labels = np.asarray(labels, dtype=np.int64)
    fraction = check_fraction(fraction)
    if labels.ndim != 1 or not len(labels):
        raise UserError(f"need one class index per training example, got shape {labels.shape}")
    if int(num_classes) < 2 or labels.min() < 0 or labels.max() >= int(num_classes):
        raise UserError(f"labels must be class indices in 0..{int(num_classes) - 1} (at least 2 classes)")
    n_flip = max(1, int(round(fraction * len(labels))))
    if n_flip >= len(labels):
        raise UserError(f"--fraction {fraction:g} flips every one of the {len(labels)} training labels; use less")
    rng = np.random.default_rng(int(seed))
    rows = np.sort(rng.choice(len(labels), size=n_flip, replace=False))
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, int(num_classes), size=n_flip)) % int(num_classes)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rows] = True
    return noisy, flipped


def bilinear_self_influence(fitted, features, *, chunk_rows: int = 8192, progress: bool = False) -> np.ndarray:
    """(N, M) float64 per-group self-influence c_j(x_n, x_n) = φ_j(x_n) · ψ_j(x_n) of a fitted bilinear method
    (`gradtrace.methods.FittedMethod`) whose training features are `features` (N, k): row chunks of Φ and of Ψ
    (computed for the chunk in query-side mode), multiplied elementwise and summed within each group."""
    n, dim = fitted.n_train, fitted.dim
    if tuple(features.shape) != (n, dim):
        raise UserError(f"training features have shape {tuple(features.shape)}, the fitted method ({n}, {dim})")
    out = np.empty((n, fitted.n_groups), dtype=np.float64)
    rows = effective_chunk_rows(int(chunk_rows), 16 * dim)
    for start, stop in row_chunks(n, rows, progress=progress, desc="self-influence"):
        prod = np.asarray(features[start:stop], dtype=np.float64) * fitted.psi_rows(start, stop).astype(np.float64)
        for j, (_, lo, hi) in enumerate(fitted.group_slices):
            out[start:stop, j] = prod[:, lo:hi].sum(1)
    return out


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


def _ci(values: list[float]) -> list[float | None]:
    if len(values) < 2:
        return [None, None]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


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
        table[k] = {"auc": point[k][0], "auc_ci95": _ci(b[:, 0].tolist()),
                    "top_found": point[k][1], "top_found_ci95": _ci(b[:, 1].tolist())}
    paired = {}
    if baseline is not None:
        base = np.array(boot[baseline]).reshape(-1, 2)
        for k in names:
            if k == baseline:
                continue
            d = np.array(boot[k]).reshape(-1, 2) - base
            paired[f"{k} - {baseline}"] = {
                "auc": point[k][0] - point[baseline][0], "auc_ci95": _ci(d[:, 0].tolist()),
                "top_found": point[k][1] - point[baseline][1], "top_found_ci95": _ci(d[:, 1].tolist())}
    return {"n": int(n), "n_flipped": int(positive.sum()), "top_fraction": float(fraction),
            "top_count": top_count(n, fraction), "n_bootstrap": int(n_bootstrap), "bootstrap_seed": int(seed),
            "scores": table, "paired": paired}
