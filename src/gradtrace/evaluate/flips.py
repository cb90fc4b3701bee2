"""What the mislabel runner ranks: seeded label flips, and the self-influence of every training example.

    noisy, flipped = flip_labels(labels, num_classes, fraction=0.1, seed=0)
    per_group = bilinear_self_influence(fitted, train_features)      # (N, M): c_j(x_n, x_n) = φ_j(x_n) · ψ_j(x_n)
    scores = per_group @ w                                           # τ_w(x_n, x_n), weights on the query side

Self-influence is the diagonal of the Q×N score matrix with the training set as its own queries; only the diagonal
is computed (one rowwise dot product per group and row chunk), never the N×N matrix. The metrics that judge the
ranking: `gradtrace.metrics.detection`.
"""
from __future__ import annotations

import numpy as np

from gradtrace.errors import UserError
from gradtrace.metrics.detection import check_fraction


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
    """(N, M) float64 per-group self-influence c_j(x_n, x_n) = φ_j(x_n) · ψ_j(x_n) of a fitted bilinear method whose
    training features are `features` (N, k): `gradtrace.methods.FittedMethod.self_contributions`."""
    return fitted.self_contributions(features, chunk_rows=chunk_rows, progress=progress)
