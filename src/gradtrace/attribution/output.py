"""The attributions artefact: each query's top-k training examples with scores and per-group breakdown.

Written into an output directory:

    attributions.json      manifest + per query: its top-k training ids with scores and per-group breakdown, and
                           each example's source (file name, caption or text; `gradtrace.data.sources`); indented
                           up to INDENTED_MAX top-k entries, larger on one line (the C JSON encoder)
    topk_ids.npy           (Q, k) training ids
    topk_scores.npy        (Q, k) float32
    topk_contributions.npy (Q, k, M) float32 per-group contributions (sum over M = the score)
    scores.npy             (Q, N) float32, only when Q·N is small enough (see FULL_SCORES_MAX)

The files are first written into a hidden staging folder inside the output directory, then renamed into
place, attributions.json last: a run that fails part-way (a full disk) leaves the previous set as it was and
never a new array beside an old or missing attributions.json.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from gradtrace.attribution.scoring import Scored
from gradtrace.data.sources import example_sources
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.features.store import FeatureStore
from gradtrace.io import check_finite, command_line, versions, write_json_atomic
from gradtrace.methods.trak import has_dual_blocks

FORMAT = "gradtrace-attributions"
FULL_SCORES_MAX = 50_000_000  # entries of the dense (Q, N) score matrix worth saving
INDENTED_MAX = 10_000  # top-k entries (Q · k) up to which attributions.json is indented; larger: one line, C encoder
PSI_IN_MEMORY = 256 * 2**20  # bytes of a float32 Ψ kept in memory; larger stores are scored query-side


def query_side_for(train: FeatureStore, kernel: str) -> bool:
    """Above PSI_IN_MEMORY bytes, Ψ = Φ K is not materialised: K goes on the queries (same scores) — unless a
    kernel block is wider than the training set (solved in its dual form, which writes Ψ)."""
    n = len(train.ids)
    return n * int(train.settings["dim"]) * 4 > PSI_IN_MEMORY and not has_dual_blocks(kernel, train.group_slices, n)


def write_attributions(scored: Scored, train: FeatureStore, queries: FeatureStore, out, *, top_k: int = 10,
                       progress: bool = True, spec: dict | None = None) -> dict:
    """Top-k training examples per query with per-group breakdown; returns the JSON document written.
    `spec` (the stage's settings) is recorded in the manifest."""
    if top_k < 1 or top_k > len(train.ids):
        raise UserError(f"--top-k must be in 1..{len(train.ids)} (the training set size), got {top_k}")
    fitted, qf, weights = scored.fitted, scored.query_features, scored.weights
    idx, top = fitted.topk(qf, top_k, weights, progress=progress)
    contrib = topk_contributions(fitted, qf, idx, weights)
    scores = scored.scores() if len(qf) * len(train.ids) <= FULL_SCORES_MAX else None
    return write_topk_attributions(train, queries, out, idx=idx, top=top, contrib=contrib, scores=scores,
                                   method_info=fitted.info, weights_info=scored.weights_info,
                                   lambda_info=scored.lambda_info, top_k=top_k, spec=spec)


def topk_contributions(fitted, query_features: np.ndarray, idx: np.ndarray, weights) -> np.ndarray:
    """(Q, k, M) float32 weighted per-group contributions w_j c_j(q, n) of each query's rows `idx` (Q, k)."""
    w = np.ones(fitted.n_groups, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
    return (fitted.topk_contributions(query_features, idx) * w).astype(np.float32)


def write_topk_attributions(train: FeatureStore, queries: FeatureStore, out, *, idx: np.ndarray, top: np.ndarray,
                            contrib: np.ndarray, scores: np.ndarray | None, method_info: dict,
                            weights_info: dict | None, lambda_info: dict | None, top_k: int, spec: dict | None,
                            extra: dict | None = None) -> dict:
    """Write the artefact from each query's top-k training rows `idx` (Q, k) (indices into the store), their
    scores, weighted contributions (Q, k, M) and, when small enough, the dense (Q, N) scores; `extra` is added to
    the manifest. Returns the JSON document written."""
    names = [g[0] for g in train.group_slices]
    top_ids = train.ids[idx]
    arrays = {"topk_ids.npy": top_ids, "topk_scores.npy": top, "topk_contributions.npy": contrib.astype(np.float32)}
    if scores is not None:
        arrays["scores.npy"] = scores
    train_source = sources_of(train, np.unique(top_ids))
    query_source = sources_of(queries, queries.ids)
    doc = {
        "manifest": {
            "format": FORMAT, "format_version": 1,
            "command": command_line(), "method": method_info, "top_k": top_k,
            "train_store": str(train.path), "query_store": str(queries.path),
            "model_fingerprint": train.settings["model_fingerprint"],
            "groups_spec": train.settings["groups_spec"], "measurement": train.settings["measurement"],
            "projection": train.settings["projection"], "weights": weights_info,
            "lambda": lambda_info, "spec": spec, "versions": versions(), **(extra or {}),
        },
        "groups": names,
        "queries": [
            {"query_id": int(queries.ids[q]), "source": query_source.get(int(queries.ids[q])),
             "top": [{"rank": r + 1, "train_id": int(top_ids[q, r]), "score": float(top[q, r]),
                      "source": train_source.get(int(top_ids[q, r])),
                      "contributions": {n: float(v) for n, v in zip(names, contrib[q, r])}}
                     for r in range(top_k)]}
            for q in range(len(idx))
        ],
    }
    _write_set(Path(out), arrays, doc)
    return doc


def sources_of(store: FeatureStore, ids) -> dict[int, dict]:
    """id -> source record (file name, caption or text) of the given ids of a store's examples; {} with a warning
    when the store records no source or its data cannot be read any more (the scores do not need it)."""
    return described(store.settings.get("source"), ids, str(store.path))


def described(source: dict | None, ids, what: str) -> dict[int, dict]:
    """id -> source record of the given ids of the examples a source record (`gradtrace.data.sources`) names; {}
    with a warning when there is none or its data cannot be read any more."""
    if not source:
        return {}
    ids = np.asarray(ids, dtype=np.int64)
    try:
        return {int(i): record for i, record in zip(ids.tolist(), example_sources(source, ids))}
    except (UserError, OSError) as exc:
        warnings.warn(GradtraceWarning(f"the examples of {what} cannot be described (file names, captions): "
                                       f"{exc}"), stacklevel=3)
        return {}


def write_contribution_attributions(contrib: np.ndarray, weights, *, train_ids, query_ids, group_names: list[str],
                                    out, top_k: int = 10, manifest: dict) -> dict:
    """The same artefact from dense per-group contributions (Q, N, M) of a method that scores the model directly
    (EK-FAC): τ_w = contrib @ w (None = all ones), plus contributions.npy (Q, N, M) when small enough and the id
    order of scores.npy's rows and columns (train_ids.npy, query_ids.npy). `manifest` holds the method's facts
    (method, sources, fingerprint, groups_spec, measurement, weights, lambda, spec); each example carries its
    source record (file name, caption or text) read from the manifest's train_source / query_source; returns the
    document."""
    n = contrib.shape[1]
    if top_k < 1 or top_k > n:
        raise UserError(f"--top-k must be in 1..{n} (the training set size), got {top_k}")
    w = np.ones(contrib.shape[2]) if weights is None else np.asarray(weights, dtype=np.float64)
    scores = contrib @ w
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    top = np.take_along_axis(scores, idx, 1)
    parts = np.take_along_axis(contrib, idx[:, :, None], 1) * w
    train_ids, query_ids = np.asarray(train_ids, np.int64), np.asarray(query_ids, np.int64)
    top_ids = train_ids[idx]
    train_source = described(manifest.get("train_source"), np.unique(top_ids), "the training data")
    query_source = described(manifest.get("query_source"), query_ids, "the queries")
    arrays = {"topk_ids.npy": top_ids, "topk_scores.npy": top.astype(np.float32),
              "topk_contributions.npy": parts.astype(np.float32), "train_ids.npy": train_ids,
              "query_ids.npy": query_ids}
    if scores.size <= FULL_SCORES_MAX:
        arrays["scores.npy"] = scores.astype(np.float32)
    if contrib.size <= FULL_SCORES_MAX:
        arrays["contributions.npy"] = contrib.astype(np.float32)
    doc = {
        "manifest": {"format": FORMAT, "format_version": 1, "command": command_line(), "top_k": top_k,
                     "train_store": None, "query_store": None, "projection": None, **manifest,
                     "versions": versions()},
        "groups": list(group_names),
        "queries": [
            {"query_id": int(query_ids[q]), "source": query_source.get(int(query_ids[q])),
             "top": [{"rank": r + 1, "train_id": int(top_ids[q, r]), "score": float(top[q, r]),
                      "source": train_source.get(int(top_ids[q, r])),
                      "contributions": {g: float(v) for g, v in zip(group_names, parts[q, r])}}
                     for r in range(top_k)]}
            for q in range(len(query_ids))
        ],
    }
    _write_set(Path(out), arrays, doc)
    if "contributions.npy" not in arrays and (Path(out) / "contributions.npy").exists():
        (Path(out) / "contributions.npy").unlink()  # from an earlier, smaller run
    return doc


def _write_set(out: Path, arrays: dict[str, np.ndarray], doc: dict) -> None:
    """Every file into a staging folder in `out`, then renamed into place with attributions.json last."""
    for name, arr in arrays.items():  # before anything is staged: a refused set leaves the previous one as it was
        check_finite(arr, f"attribute ({name})", "NaN/Inf features or weights, or a kernel too ill-conditioned for "
                     "the chosen --lambda-c (raise it)")
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".attributions-{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        for name, arr in arrays.items():
            np.save(stage / name, arr)
        entries = sum(len(q["top"]) for q in doc["queries"])
        write_json_atomic(stage / "attributions.json", doc, indent=2 if entries <= INDENTED_MAX else None)
        for name in [*arrays, "attributions.json"]:
            os.replace(stage / name, out / name)
        if "scores.npy" not in arrays and (out / "scores.npy").exists():
            (out / "scores.npy").unlink()  # from an earlier, smaller run: it would not match this one
    finally:
        shutil.rmtree(stage, ignore_errors=True)
