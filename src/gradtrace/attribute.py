"""Attribution: score query features against training features and keep each query's top-k.

Writes into an output directory:

    attributions.json     manifest + per query: its top-k training ids with scores and per-group breakdown
    topk_ids.npy          (Q, k) training ids
    topk_scores.npy       (Q, k) float32
    topk_contributions.npy (Q, k, M) float32 per-group contributions (sum over M = the score)
    scores.npy            (Q, N) float32, only when Q·N is small enough (see FULL_SCORES_MAX)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.manifest import versions, write_json_atomic
from gradtrace.methods import DEFAULT_C, get_method

FULL_SCORES_MAX = 50_000_000  # entries of the dense (Q, N) score matrix worth saving
PSI_IN_MEMORY = 256 * 2**20  # bytes of a float32 Ψ kept in memory; larger stores are scored query-side


def fit_method(train: FeatureStore, method: str = "trak", *, kernel: str = "shared", c: float = DEFAULT_C,
               progress: bool = True, query_side: bool = False):
    """The fitted base method for a training store (Ψ = Φ K), refusing a method/measurement mismatch.

    `query_side` (TRAK/D-TRAK): apply K to the queries and score against the store's Φ directly."""
    measurement = train.settings["measurement"]["name"]
    if method == "dtrak" and measurement != "dtrak":
        raise UserError(f"method 'dtrak' needs features of measurement 'dtrak', but {train.path} was "
                        f"featurized with '{measurement}'; featurize with --measurement dtrak or use --method trak")
    kwargs = {} if method == "tracin" else {"kernel": kernel, "c": c}
    if query_side and method != "tracin":
        return get_method(method, **kwargs).fit(train.features, train.group_slices, progress=progress,
                                                query_side=True)
    return get_method(method, **kwargs).fit(train.features, train.group_slices, progress=progress)


def attribute(train: FeatureStore, queries: FeatureStore, out, *, method: str = "trak", kernel: str = "shared",
              c: float = DEFAULT_C, top_k: int = 10, weights=None, weights_info: dict | None = None,
              lambda_info: dict | None = None, progress: bool = True) -> dict:
    """Top-k training examples per query with per-group breakdown; returns the JSON document written."""
    train.check_compatible(queries)
    if top_k < 1 or top_k > len(train.ids):
        raise UserError(f"--top-k must be in 1..{len(train.ids)} (the training set size), got {top_k}")
    # Above PSI_IN_MEMORY bytes, Ψ = Φ K is not materialised: K goes on the queries (same scores)
    big = len(train.ids) * int(train.settings["dim"]) * 4 > PSI_IN_MEMORY
    fitted = fit_method(train, method, kernel=kernel, c=c, progress=progress, query_side=big)
    qf = np.asarray(queries.features)
    idx, top = fitted.topk(qf, top_k, weights, progress=progress)
    w = np.ones(fitted.n_groups, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
    contrib = np.stack([fitted.contributions(qf[q:q + 1], rows=idx[q])[0] for q in range(len(qf))]) * w
    names = fitted.group_names
    top_ids = train.ids[idx]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / "topk_ids.npy", top_ids)
    _save_npy(out / "topk_scores.npy", top)
    _save_npy(out / "topk_contributions.npy", contrib.astype(np.float32))
    if len(qf) * len(train.ids) <= FULL_SCORES_MAX:
        _save_npy(out / "scores.npy", fitted.scores(qf, weights))
    doc = {
        "manifest": {
            "format": "gradtrace-attributions", "format_version": 1,
            "command": " ".join(sys.argv), "method": fitted.info, "top_k": top_k,
            "train_store": str(train.path), "query_store": str(queries.path),
            "model_fingerprint": train.settings["model_fingerprint"],
            "groups_spec": train.settings["groups_spec"], "measurement": train.settings["measurement"],
            "projection": train.settings["projection"], "weights": weights_info, "lambda": lambda_info,
            "versions": versions(),
        },
        "groups": names,
        "queries": [
            {"query_id": int(queries.ids[q]),
             "top": [{"rank": r + 1, "train_id": int(top_ids[q, r]), "score": float(top[q, r]),
                      "contributions": {n: float(v) for n, v in zip(names, contrib[q, r])}}
                     for r in range(top_k)]}
            for q in range(len(qf))
        ],
    }
    write_json_atomic(out / "attributions.json", doc)
    return doc


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
