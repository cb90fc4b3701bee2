"""Learned weights as an artefact: a JSON file of group name → weight plus where they came from.

    {"format": "gradtrace.group-weights/1", "weights": {name: w, ...}, "group_names": [...],
     "provenance": {...}, "learning": {k, steps, lr, l2, Q, N, M, path, first_loss, last_loss, ...},
     "versions": {...}}

`provenance` is the caller's record of the inputs; recommended keys: base_method (name, kernel, c / λ),
store (fingerprint and settings of the feature store), groups_preset, learning_queries (an id of the
learning-query set). `learning` is filled from the result.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from gradtrace.errors import UserError
from gradtrace.io import check_finite, read_json, versions, write_json_atomic
from gradtrace.weights.learn import WeightsResult

FORMAT = "gradtrace.group-weights/1"
_LEARNING_KEYS = ("k", "steps", "lr", "l2", "seed", "Q", "N", "M", "path", "uniform_loss", "final_loss")


def save_weights(path: str | os.PathLike, result: WeightsResult, provenance: dict) -> Path:
    """Write `result` with `provenance` (a JSON-able dict) to `path` atomically; returns the path."""
    if not isinstance(result, WeightsResult):
        raise UserError(f"result must be a WeightsResult from learn_weights, got {type(result).__name__}")
    if not isinstance(provenance, dict):
        raise UserError(f"provenance must be a dict (base method, store, groups, learning-query id), "
                        f"got {type(provenance).__name__}")
    try:
        json.dumps(provenance)
    except (TypeError, ValueError) as exc:
        raise UserError(f"provenance is not JSON-serialisable ({exc}); pass plain numbers, strings, lists, dicts")
    check_finite(np.asarray(result.weights, dtype=np.float64), "learn-weights",
                 "the learning queries' scores are NaN/Inf or the optimiser diverged; check the feature stores or "
                 "lower --lr")
    learning = {key: result.info[key] for key in _LEARNING_KEYS if key in result.info}
    if result.loss_curve:
        learning["first_loss"], learning["last_loss"] = result.loss_curve[0], result.loss_curve[-1]
    doc = {"format": FORMAT,
           "weights": {name: float(w) for name, w in zip(result.group_names, result.weights)},
           "group_names": list(result.group_names), "provenance": provenance, "learning": learning,
           "versions": versions()}
    path = Path(path)
    write_json_atomic(path, doc)
    return path


def load_weights(path: str | os.PathLike, group_names: Any) -> tuple[np.ndarray, dict]:
    """(weights (M,) float64 in the order of `group_names`, the whole document); UserError if they differ."""
    names = [str(n) for n in group_names]
    doc = read_json(path, "weights file")
    fix = "re-learn the weights for these groups (gradtrace.weights.learn_weights)"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path} is not a gradtrace weights file ({FORMAT}); {fix}")
    table = doc.get("weights")
    if not isinstance(table, dict) or not table:
        raise UserError(f"{path} has no 'weights' table of group name -> weight; {fix}")
    missing = [n for n in names if n not in table]
    extra = [n for n in table if n not in set(names)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} group(s) e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unknown group(s) e.g. {', '.join(extra[:3])}")
        raise UserError(f"{path} was learned for other parameter groups ({'; '.join(parts)}); {fix}")
    values = []
    for n in names:
        v = table[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UserError(f"{path} has an invalid weight for group '{n}' ({v!r}); weights must be finite and >= 0")
        values.append(float(v))
    weights = np.array(values, dtype=np.float64)
    if weights.sum() <= 0:
        raise UserError(f"{path} has all-zero weights; {fix}")
    return weights, doc
