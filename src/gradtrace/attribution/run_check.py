"""An attributions run as a reader finds it: attributions.json and its arrays, checked whole before any use.

One rule for every reader of a run (`report`, `eval lds --attributions`, `eval counterfactual --attributions`):
attributions.json is a gradtrace attributions document; its queries have unique ids; every array the writer
always writes (topk_ids.npy, topk_scores.npy, topk_contributions.npy) is there, readable, of shape (Q, k) or
(Q, k, M) for the document's Q queries, k = top_k and M groups, and finite; each query's top-k ids are unique and
are the ids the document lists, with the same scores; the arrays written when small enough (scores.npy,
contributions.npy, train_ids.npy, query_ids.npy) agree with those shapes and ids when present. Anything else
is refused in one line naming the file and the fix (attribute again).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gradtrace.errors import UserError
from gradtrace.io import check_unique_ids, read_json

FORMAT = "gradtrace-attributions"
DOCUMENT = "attributions.json"
ALWAYS = ("topk_ids.npy", "topk_scores.npy", "topk_contributions.npy")
OPTIONAL = ("scores.npy", "contributions.npy", "train_ids.npy", "query_ids.npy")
FIX = "attribute again into a new --out"


def open_run(folder, what: str = "`gradtrace attribute`") -> tuple[Path, dict]:
    """(run folder, attributions.json's document) of `folder` (or of the attributions.json it names), checked
    whole (see the module rule)."""
    path = Path(folder)
    file = path / DOCUMENT if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{folder} has no {DOCUMENT}; pass the output folder of {what}")
    doc = read_json(file, what)
    manifest = doc.get("manifest") if isinstance(doc, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(doc.get("queries"), list):
        raise UserError(f"{file} is not a gradtrace attributions file; pass the output folder of {what}")
    check_run(file.parent, doc)
    return file.parent, doc


def check_run(path: Path, doc: dict) -> None:
    """Refuse a run whose arrays are missing, damaged, or disagree with its document (see the module rule)."""
    where = f"attributions run {path}"
    try:
        k, groups = int(doc["manifest"]["top_k"]), list(doc["groups"])
        query_ids = np.asarray([int(q["query_id"]) for q in doc["queries"]], dtype=np.int64)
        listed = np.asarray([[int(t["train_id"]) for t in q["top"]] for q in doc["queries"]], dtype=np.int64)
        listed_scores = np.asarray([[float(t["score"]) for t in q["top"]] for q in doc["queries"]], np.float32)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: {DOCUMENT} lacks its queries' top-k ids and scores; {FIX}") from None
    nq = len(query_ids)
    if listed.shape != (nq, k):
        raise UserError(f"{where}: {DOCUMENT} lists other than {k} training examples per query; {FIX}")
    check_unique_ids(query_ids, f"{where} ({DOCUMENT} query ids)", FIX)
    arrays = {name: _load(path, name, where) for name in ALWAYS}
    arrays.update({name: _load(path, name, where) for name in OPTIONAL if (path / name).exists()})
    n = len(arrays["train_ids.npy"]) if "train_ids.npy" in arrays else None
    if n is None and "scores.npy" in arrays and arrays["scores.npy"].ndim == 2:
        n = arrays["scores.npy"].shape[1]
    shapes = {"topk_ids.npy": (nq, k), "topk_scores.npy": (nq, k), "topk_contributions.npy": (nq, k, len(groups)),
              "scores.npy": (nq, n), "contributions.npy": (nq, n, len(groups)), "train_ids.npy": (n,),
              "query_ids.npy": (nq,)}
    for name, arr in arrays.items():
        if arr.shape != shapes[name]:
            raise UserError(f"{where}: {name} has shape {arr.shape}, the run's document says {shapes[name]}; {FIX}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"{where}: {name} holds NaN/Inf; {FIX}")
    for q, row in enumerate(arrays["topk_ids.npy"]):
        check_unique_ids(row, f"{where} (topk_ids.npy, query {int(query_ids[q])})", FIX)
    if not np.array_equal(arrays["topk_ids.npy"], listed) or \
            not np.array_equal(arrays["topk_scores.npy"].astype(np.float32), listed_scores):
        raise UserError(f"{where}: topk_ids.npy/topk_scores.npy differ from {DOCUMENT} (files from two runs); {FIX}")
    if "train_ids.npy" in arrays:
        check_unique_ids(arrays["train_ids.npy"], f"{where} (train_ids.npy)", FIX)
    if "query_ids.npy" in arrays and not np.array_equal(arrays["query_ids.npy"], query_ids):
        raise UserError(f"{where}: query_ids.npy differs from {DOCUMENT}'s queries; {FIX}")


def _load(path: Path, name: str, where: str) -> np.ndarray:
    if not (path / name).is_file():
        raise UserError(f"{where} lacks {name} (an unfinished or damaged run); {FIX}")
    try:
        return np.load(path / name, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{where}: {name} is unreadable ({str(exc).splitlines()[0][:100]}); {FIX}") from None
