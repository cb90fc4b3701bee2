"""The Gram blocks of a λ kernel kept beside the training store, so that only the first fit pays for them.

    gram = store_gram(train, base, progress=True)      # read from STORE/gram/, or computed and written there

A per-group (or shared) TRAK kernel needs Φ_jᵀΦ_j, one pass over every training row in float64 (at k = 8,192 with
16 groups, about as long as scoring 1,000 queries). The blocks depend on the rows and the kernel's column spans
only, not on c, the weights or the queries, so `attribute`, `learn-weights` and sharded `attribute` on the same
store reuse them.

Layout: ``STORE/gram/<kernel>.npy`` (the blocks' float64 values, concatenated) and ``STORE/gram/<kernel>.json``
(format, kernel, column spans, rows, the store's fingerprint, the sha256 of the .npy's bytes, how many ranks summed
them, versions), each written atomically, the manifest last. A cache is used only when its manifest names this
store's fingerprint — rows, ids, settings (model, groups, projection, measurement, dtype), the digest of every
chunk, and the size and modification time of features.npy — and the same kernel spans and its bytes match their
digest; any other cache (rows added, re-featurized, another group layout, a damaged file) is computed again and
replaced. A store directory that cannot be written is scored without a cache.

Bits: blocks read from a cache are the bits the fit computed, so a later single-process fit equals a fit without
the cache exactly; blocks summed by P ranks (`"ranks": P`) differ from one process's in the last bits of the float64
sums. Only stores larger than CACHE_MIN_BYTES (N·k·4, as the query-side mode's threshold; the environment variable
GRADTRACE_GRAM_CACHE_MIN_BYTES overrides it) are cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from gradtrace.features.store import FeatureStore
from gradtrace.io import atomic_write, read_json, versions, write_json_atomic
from gradtrace.methods.trak import Gram, has_dual_blocks, kernel_spans

FORMAT = "gradtrace.gram-cache/1"
FOLDER = "gram"
CACHE_MIN_BYTES = 256 * 2**20  # N · k · 4 above which the Gram blocks are kept (the query-side threshold)
MIN_BYTES_ENV = "GRADTRACE_GRAM_CACHE_MIN_BYTES"  # overrides CACHE_MIN_BYTES (e.g. 0 to cache small stores too)


def cache_min_bytes() -> int:
    """CACHE_MIN_BYTES, or the value of the environment variable MIN_BYTES_ENV when set."""
    value = os.environ.get(MIN_BYTES_ENV)
    return CACHE_MIN_BYTES if value in (None, "") else int(value)


def wants_cache(train: FeatureStore, base: Any) -> bool:
    """Whether this method's Gram blocks on this store are worth keeping: a λ kernel sharing its Gram, a complete
    store above CACHE_MIN_BYTES, no block solved in the dual form (whose N × N blocks are not sums over rows)."""
    n, k = len(train.ids), int(train.settings["dim"])
    return (bool(getattr(base, "shares_gram", False)) and train.complete and n * k * 4 > cache_min_bytes()
            and not has_dual_blocks(base.kernel_kind, train.group_slices, n))


def store_fingerprint(train: FeatureStore) -> str:
    """sha256 of what the Gram blocks depend on: rows, ids, settings, every chunk's digest, features.npy's stat."""
    stat = os.stat(train.path / "features.npy")
    keys = ("model_fingerprint", "groups", "projection", "measurement", "dtype", "dim")
    doc = {"rows": len(train.ids), "settings": {key: train.settings.get(key) for key in keys},
           "chunks": sorted((int(c), d) for c, d in train._progress().done().items()),
           "features": [stat.st_size, stat.st_mtime_ns]}
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(train.ids).tobytes())
    return h.hexdigest()


def _paths(train: FeatureStore, kernel: str):
    folder = train.path / FOLDER
    return folder / f"{kernel}.npy", folder / f"{kernel}.json"


def load_gram(train: FeatureStore, kernel: str) -> tuple[Gram | None, str]:
    """(the cached Gram, "hit"), or (None, why not: "absent" or "stale")."""
    npy, manifest = _paths(train, kernel)
    if not manifest.exists() or not npy.exists():
        return None, "absent"
    spans = kernel_spans(kernel, train.group_slices, int(train.settings["dim"]))
    try:
        doc = read_json(manifest, "Gram cache manifest")
        if not (isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("kernel") == kernel
                and doc.get("spans") == [list(s) for s in spans] and doc.get("rows") == len(train.ids)
                and doc.get("store_fingerprint") == store_fingerprint(train)):
            return None, "stale"
        flat = np.load(npy, allow_pickle=False)
    except Exception:  # noqa: BLE001 - an unreadable cache is computed again
        return None, "stale"
    sizes = [(e - s) ** 2 for s, e in spans]
    if flat.dtype != np.float64 or flat.shape != (sum(sizes),) or \
            hashlib.sha256(flat.tobytes()).hexdigest() != doc.get("sha256"):
        return None, "stale"
    blocks, at = [], 0
    for (s, e), size in zip(spans, sizes):
        blocks.append(flat[at:at + size].reshape(e - s, e - s).copy())
        at += size
    return Gram(kernel=kernel, blocks=blocks, group_slices=list(train.group_slices), n=len(train.ids),
                dual=[False] * len(blocks)), "hit"


def save_gram(train: FeatureStore, gram: Gram, *, ranks: int = 1) -> bool:
    """Write `gram` as this store's cache (False, nothing written, when the store's folder is not writable)."""
    npy, manifest = _paths(train, gram.kernel)
    spans = kernel_spans(gram.kernel, train.group_slices, int(train.settings["dim"]))
    flat = np.concatenate([b.reshape(-1) for b in gram.blocks]).astype(np.float64, copy=False)
    doc = {"format": FORMAT, "kernel": gram.kernel, "spans": [list(s) for s in spans], "rows": len(train.ids),
           "store_fingerprint": store_fingerprint(train), "sha256": hashlib.sha256(flat.tobytes()).hexdigest(),
           "ranks": int(ranks), "versions": versions()}
    try:
        with atomic_write(npy, suffix=".tmp.npy") as tmp:
            np.save(tmp, flat)
        write_json_atomic(manifest, doc)
    except OSError:  # a read-only or full disk: score without the cache
        return False
    return True


def store_gram(train: FeatureStore, base: Any, *, progress: bool = False) -> tuple[Gram, str]:
    """(the Gram blocks of `base`'s kernel on this store, "hit" | "written" | "recomputed" | "not writable")."""
    gram, state = load_gram(train, base.kernel_kind)
    if gram is not None:
        return gram, state
    gram = base.gram(train.features, train.group_slices, progress=progress)
    if not save_gram(train, gram):
        return gram, "not writable"
    return gram, "written" if state == "absent" else "recomputed"
