"""Weights for the held-out shapes benchmark beyond `learn-weights`: the label-free contrast statistic
(`gradtrace.weights.contrast`) and an ORACLE ceiling that uses the training labels (a diagnostic of this benchmark,
not a product feature: it says whether any non-negative per-group weighting can lift an aspect at all).

Oracle: per aspect A, weights maximising a supervised signal-to-noise ratio,

    L(w) = − mean_q [ mean_{n: y_A(n) = y_A(q), n not masked} τ_w(q, n) ] / ‖τ_w(q, ·)‖₂

(AdamW on w = softmax(θ) from uniform, the SNR learner's steps and lr) over one of two query sets, never the
evaluation queries:
- `loo`: 240 training images (seeded) as queries, featurized as the evaluation queries are (`loo_store`: the
  training store featurized with every token null; a token-conditioned query would carry its labels), each with
  the training rows of its own combination (itself included) masked out (contributions set to 0), as a held-out
  combination would see them; y_A from training labels;
- `learn`: the general learning queries, y_A(q) the value each was sampled with, training labels for y_A(n).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ASPECTS = ("subject", "style", "background")
N_LOO = 240


def _fitted(cache: dict, train, method: str, kernel: str, c: float):
    from gradtrace.attribution import fit_method

    key = (str(train.path), method, kernel, float(c))
    if key not in cache:
        cache.clear()  # one Ψ in memory at a time
        cache[key] = fit_method(train, method, kernel=kernel, c=float(c), progress=False)
    return cache[key]


def _labels(store, side: str) -> dict:
    from gradtrace.evaluate.eval_retrieval import labels_of

    return labels_of(store.settings["source"], store.ids, list(ASPECTS), None, side)


def _save(path: Path, result, general_doc: dict, extra: dict) -> str:
    from gradtrace.weights import save_weights

    prov = {**general_doc["provenance"], **extra}
    save_weights(path, result, prov)
    return str(path)


def oracle_weights(cache: dict, train, learn, loo_store, general_path: str, method: str, kernel: str, aspect: str,
                   mode: str, steps: int) -> str:
    """A weights file of the oracle above (mode `loo` or `learn`), beside the general weights."""
    from gradtrace.attribution import query_set_id
    from gradtrace.io import read_json
    from gradtrace.weights.learn import WeightsResult, dense_contributions, optimise_weights
    from gradtrace.weights.objective import ratio_loss, softmax_weights

    path = Path(train.path) / "weights" / f"{method}-{kernel}-oracle-{mode}-{aspect}.json"
    if path.exists():
        return str(path)
    doc = read_json(general_path, "weights file")
    fitted = _fitted(cache, train, method, kernel, doc["provenance"]["lambda_c"])
    tl = _labels(train, "train")
    y_train = np.array([str(v) for v in tl[aspect]])
    if mode in ("loo", "solo"):
        rows = np.sort(np.random.default_rng(29).choice(len(train.ids), N_LOO, replace=False))
        if not np.array_equal(np.asarray(loo_store.ids), np.asarray(train.ids)):
            raise ValueError("the leave-one-out queries must be the training images")
        contrib = dense_contributions(fitted, np.asarray(loo_store.features[rows], dtype=np.float64))
        combo = np.array(["|".join(str(tl[a][i]) for a in ASPECTS) for i in range(len(train.ids))])
        masked = combo[rows][:, None] == combo[None, :]
        contrib[masked] = 0.0
        rel = (y_train[rows][:, None] == y_train[None, :]) & ~masked
        queries = query_set_id(loo_store)
    else:
        contrib = dense_contributions(fitted, np.asarray(learn.features, dtype=np.float64))
        yq = np.array([str(v) for v in _labels(learn, "learning")[aspect]])
        rel = yq[:, None] == y_train[None, :]
        queries = query_set_id(learn)
    if mode == "solo":
        return _solo(path, contrib, masked, rel, fitted, doc, aspect, queries)
    c_t = torch.from_numpy(contrib)
    rel_t = torch.from_numpy(rel.astype(np.float64))
    count = rel_t.sum(1).clamp(min=1)

    def make():
        def loss(w, last=False):
            tau = c_t @ w
            return ratio_loss((tau * rel_t).sum(1) / count, tau.norm(dim=1))
        return loss, "dense-oracle"

    opts = {"k": 10, "steps": int(steps), "lr": 0.05, "l2": 0.0, "seed": 0}
    theta, curve, info = optimise_weights(make, tuple(contrib.shape), opts, False)
    w = softmax_weights(torch.from_numpy(theta)).numpy().astype(np.float64)
    result = WeightsResult(weights=w, theta=theta, group_names=fitted.group_names, loss_curve=curve, info=info)
    return _save(path, result, doc, {"objective": f"ORACLE-{mode} (uses training labels; diagnostic only)",
                                     "aspect": aspect, "learning_queries": queries})


def _top10_precision(tau: np.ndarray, masked: np.ndarray, rel: np.ndarray) -> float:
    tau = np.where(masked, -np.inf, tau)
    top = np.argsort(-tau, axis=1, kind="stable")[:, :10]
    return float(np.take_along_axis(rel, top, axis=1).mean())


def _solo(path: Path, contrib, masked, rel, fitted, doc, aspect: str, queries) -> str:
    """ORACLE-solo: all the weight on the one group whose scores alone rank same-value training images highest for
    the leave-one-out queries (top-10 precision); the per-group and uniform precisions are recorded."""
    from gradtrace.weights.learn import WeightsResult

    solo = [_top10_precision(contrib[:, :, j], masked, rel) for j in range(contrib.shape[2])]
    w = np.zeros(contrib.shape[2])
    w[int(np.argmax(solo))] = 1.0
    info = {"k": 10, "steps": 0, "Q": int(contrib.shape[0]), "N": int(contrib.shape[1]), "M": int(contrib.shape[2]),
            "path": "oracle-solo", "solo_top10_precision": solo, "best_group": fitted.group_names[int(np.argmax(solo))],
            "uniform_top10_precision": _top10_precision(contrib.sum(2), masked, rel)}
    result = WeightsResult(weights=w, theta=w, group_names=fitted.group_names, loss_curve=[], info=info)
    return _save(path, result, doc, {"objective": "ORACLE-solo (uses training labels; diagnostic only)",
                                     "aspect": aspect, "learning_queries": queries, "oracle": info})


def contrast_weights_file(cache: dict, train, learn, general_path: str, method: str, kernel: str,
                          aspect: str) -> str:
    """A weights file of the contrast statistic (`gradtrace.weights.contrast`) over the general weights, on the
    general learning queries and the values they were sampled with."""
    from gradtrace.io import read_json
    from gradtrace.weights import load_weights
    from gradtrace.weights.contrast import learn_contrast_weights

    path = Path(train.path) / "weights" / f"{method}-{kernel}-contrast-{aspect}.json"
    if path.exists():
        return str(path)
    doc = read_json(general_path, "weights file")
    fitted = _fitted(cache, train, method, kernel, doc["provenance"]["lambda_c"])
    base, _ = load_weights(general_path, fitted.group_names)
    result = learn_contrast_weights(fitted, np.asarray(learn.features), _labels(learn, "learning"), aspect, base)
    return _save(path, result, doc, {"objective": "contrast", "aspect": aspect})
