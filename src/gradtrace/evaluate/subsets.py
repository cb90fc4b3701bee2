"""LDS training subsets: S subsets of round(α·N) training ids, drawn once from a recorded seed.

Subset s is drawn as the s-th call of one numpy Generator (PCG64) seeded with `seed`, choosing rows of the
sorted training ids without replacement; every subset is stored sorted. The same (ids, S, α, seed) give
the same subsets on every machine, and the first S subsets do not depend on how many are drawn after.

On disk (beside the retrained models): ``subsets.npy`` (S, m) int64 training ids and ``subsets.json``
(seed, fraction, sizes, a fingerprint of the training ids and the subsets as lists).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gradtrace.errors import UserError
from gradtrace.io import check_unique_ids, read_json, sha256_arrays, versions, write_json_atomic, write_npy_atomic

FORMAT = "gradtrace-lds-subsets"
NPY = "subsets.npy"
JSON = "subsets.json"


def subset_size(n_train: int, fraction: float) -> int:
    """round(α·N), refusing fractions that give an empty or a full subset."""
    if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise UserError(f"--fraction must be strictly between 0 and 1, got {fraction}")
    m = int(round(float(fraction) * int(n_train)))
    if m < 1 or m >= n_train:
        raise UserError(f"fraction {fraction} of {n_train} training examples gives subsets of {m}; "
                        f"choose a fraction giving 1..{n_train - 1} examples")
    return m


def draw_subsets(train_ids, n_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """(S, round(α·N)) int64 array of training ids, each row sorted, reproducible from `seed`."""
    ids = np.sort(np.asarray(train_ids, dtype=np.int64).reshape(-1))
    check_unique_ids(ids, "the run's training ids", "train the run again on a deduplicated --ids file")
    if int(n_subsets) != n_subsets or n_subsets < 2:
        raise UserError(f"--subsets must be an integer >= 2 (a correlation needs at least two), got {n_subsets}")
    if int(seed) != seed or seed < 0:
        raise UserError(f"subset seed must be a non-negative integer, got {seed}")
    m = subset_size(len(ids), fraction)
    rng = np.random.default_rng(int(seed))
    rows = [np.sort(rng.choice(len(ids), size=m, replace=False)) for _ in range(int(n_subsets))]
    return ids[np.stack(rows)]


def subsets_doc(subsets: np.ndarray, train_ids, fraction: float, seed: int) -> dict:
    ids = np.sort(np.asarray(train_ids, dtype=np.int64))
    return {"format": FORMAT, "format_version": 1, "seed": int(seed), "fraction": float(fraction),
            "n_subsets": int(subsets.shape[0]), "n_train": int(len(ids)), "subset_size": int(subsets.shape[1]),
            "train_ids_sha256": sha256_arrays([ids]), "subsets_sha256": sha256_arrays([subsets]),
            "draw": "numpy.random.default_rng(seed): subset s = sorted(choice(N, m, replace=False)) of the "
                    "sorted training ids, s = 0..S-1",
            "versions": versions(), "subsets": subsets.tolist()}


def save_subsets(directory, subsets: np.ndarray, train_ids, fraction: float, seed: int) -> dict:
    """Write subsets.npy and subsets.json (atomically) into `directory`; returns the JSON document."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_npy_atomic(directory / NPY, np.asarray(subsets, dtype=np.int64))  # ranks may write it at once
    doc = subsets_doc(subsets, train_ids, fraction, seed)
    write_json_atomic(directory / JSON, doc)
    return doc


def load_subsets(directory) -> tuple[np.ndarray, dict]:
    """The saved subsets and their JSON document, checked against each other and against a redraw."""
    directory = Path(directory)
    doc = read_json(directory / JSON, "LDS subsets file")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{directory / JSON} is not a gradtrace subsets file; run `gradtrace retrain` first")
    try:
        subsets = np.load(directory / NPY)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {directory / NPY} ({exc}); rerun `gradtrace retrain` into a new --out")
    if sha256_arrays([subsets]) != doc.get("subsets_sha256"):
        raise UserError(f"{directory / NPY} does not match {directory / JSON}; the files were modified, "
                        "rerun `gradtrace retrain` into a new --out")
    for s, row in enumerate(np.asarray(subsets).reshape(len(subsets), -1)):
        check_unique_ids(row, f"{directory / NPY} (subset {s})", "rerun `gradtrace retrain` into a new --out")
    return subsets, doc
