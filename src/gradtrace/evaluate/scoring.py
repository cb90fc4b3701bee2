"""Scores for evaluation: fit a base method on the training store, load group weights, score queries."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradtrace.errors import UserError
from gradtrace.manifest import read_json


@dataclass
class Scored:
    fitted: object            # gradtrace.methods.FittedMethod
    query_features: np.ndarray
    weights: np.ndarray | None
    weights_info: dict | None
    lambda_info: dict | None = None  # how c was chosen (given, the weights', default, or auto on learning queries)

    def scores(self, weights=None) -> np.ndarray:
        """(Q, N) τ_w; `weights` None = the loaded weights (or uniform when none were loaded)."""
        return self.fitted.scores(self.query_features, weights=self.weights if weights is None else weights)


def load_group_weights(path, group_names: list[str]) -> tuple[np.ndarray, dict]:
    """Group weights (M,) in `group_names` order from a file, with a description for manifests.

    A file written by `gradtrace.weights.save_weights` is read by `gradtrace.weights.load_weights`; a plain
    JSON {"weights": {group: w, ...}} (no "format" key; every group named, finite, non-negative) is also
    accepted (and is the only kind read when gradtrace.weights is not installed).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file not found: {path}")
    doc = read_json(path, "weights file")
    try:
        from gradtrace.weights import load_weights
    except ImportError:
        load_weights = None
    if load_weights is not None and isinstance(doc, dict) and "format" in doc:
        w, doc = load_weights(path, group_names)
        w = np.asarray(w, dtype=np.float64)
    else:
        w = _plain_weights(path, doc, group_names)
    info = {"path": str(path.resolve()), "format": doc.get("format", "plain"),
            "weights": dict(zip(group_names, w.tolist()))}
    if isinstance(doc.get("provenance"), dict):
        info["provenance"] = doc["provenance"]
    return w, info


def _plain_weights(path: Path, doc, group_names: list[str]) -> np.ndarray:
    table = doc.get("weights") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise UserError(f"{path} has no 'weights' object; write {{\"weights\": {{group: weight, ...}}}}")
    missing = [g for g in group_names if g not in table]
    extra = [g for g in table if g not in group_names]
    if missing or extra:
        raise UserError(f"weights in {path} do not name the feature groups (missing {missing[:3]}, unknown "
                        f"{extra[:3]}); learn them on features with the same groups")
    try:
        w = np.asarray([float(table[g]) for g in group_names], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"weights in {path} must be numbers") from None
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"weights in {path} must be finite, non-negative and not all zero")
    return w


def score_queries(train_store, query_store, *, method: str = "trak", kernel: str = "shared", c=None,
                  weights=None, weights_path=None, learning_queries=None, progress: bool = True) -> Scored:
    """Fit `method` on the training store and prepare the query features (compatible stores only).

    `weights` (M,) array or `weights_path` (a file) set the group weights; both None = uniform. A weights
    file from `gradtrace learn-weights` goes through `gradtrace.learning.weights_for_attribution`, which
    refuses files for another store or method and queries that were the weights' learning queries.
    λ scale: `c` when given, else the c the weights were learned with, else the default; c = "auto" chooses
    it by the SNR rule on `learning_queries` (a feature store other than the queries scored).
    """
    from gradtrace.attribute import fit_method
    from gradtrace.learning import resolve_lambda_for_attribution

    if weights is not None and weights_path is not None:
        raise UserError("pass group weights either as an array or as a file, not both")
    train_store.check_compatible(query_store)
    info = None
    if weights_path is not None:
        weights, info = _weights_file(train_store, query_store, weights_path, method, kernel)
    elif weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        info = {"weights": dict(zip(train_store.group_names, weights.tolist()))}
    c, lambda_info = resolve_lambda_for_attribution(train_store, query_store, method=method, kernel=kernel, c=c,
                                                    weights_info=info, learning_queries=learning_queries)
    fitted = fit_method(train_store, method, kernel=kernel, c=c, progress=progress)
    return Scored(fitted=fitted, query_features=np.asarray(query_store.features), weights=weights,
                  weights_info=info, lambda_info=lambda_info)


def _weights_file(train_store, query_store, path, method: str, kernel: str) -> tuple[np.ndarray, dict]:
    path = Path(path)
    doc = read_json(path, "weights file")
    try:
        from gradtrace.learning import weights_for_attribution
    except ImportError:
        weights_for_attribution = None
    if weights_for_attribution is not None and isinstance(doc, dict) and "format" in doc:
        w, info = weights_for_attribution(train_store, query_store, weights_path=path, method=method, kernel=kernel)
        return np.asarray(w, dtype=np.float64), {**info, "path": str(path.resolve()), "format": doc["format"]}
    return load_group_weights(path, train_store.group_names)
