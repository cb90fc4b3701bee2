"""Ground-truth model outputs for the LDS: each query's output under each retrained model, cached.

The output itself is the adapter's (`ModelAdapter.outputs`: for diffusion, the query's loss averaged over
the `OutputGrid` of timesteps × noise draws shared by every model); this module only runs it over the
models and keeps the results.

Cache: ``<cache>/<key>/manifest.json`` (the query set and grid; key = hash of both) and one
``<model name>-<fingerprint[:16]>.npy`` (Q,) float64 per model, written atomically; a model whose
weights change gets a new file, so only missing models are ever computed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace.adapters import ModelAdapter
from gradtrace.adapters.base import OutputGrid
from gradtrace.data.sources import Examples
from gradtrace.errors import UserError
from gradtrace.features.store import cache_dir_for
from gradtrace.io import read_json, sha256_arrays, versions, write_json_atomic, write_npy_atomic

__all__ = ["OutputGrid", "cache_key", "model_outputs", "store_examples"]


def cache_key(images: torch.Tensor, ids, cond, source: dict, grid: OutputGrid) -> str:
    doc = {"source": source, "ids": sha256_arrays([np.asarray(ids, dtype=np.int64)]),
           "images": sha256_arrays([images]), "cond": None if cond is None else sha256_arrays([np.asarray(cond)]),
           "grid": grid.info()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_outputs(adapter: ModelAdapter, models: list[tuple[str, Path]], examples: Examples, cache_dir,
                  grid: OutputGrid = OutputGrid(), *, progress: bool = True) -> tuple[np.ndarray, dict]:
    """(n_models, Q) float64 outputs of every query under every model (cached); and the cache manifest."""
    ids = np.asarray(examples.ids, dtype=np.int64)
    images = torch.as_tensor(examples.images, dtype=torch.float32)
    key = cache_key(images, ids, examples.cond, examples.source, grid)
    cache = Path(cache_dir) / key
    manifest_path = cache / "manifest.json"
    if manifest_path.exists():
        manifest = read_json(manifest_path, "model-output cache manifest")
    else:
        manifest = {"format": "gradtrace-model-outputs", "format_version": 1, "grid": grid.info(),
                    "query_source": examples.source, "query_ids": ids.tolist(),
                    "output": f"{adapter.output_name}, mean over grid", "versions": versions()}
        write_json_atomic(manifest_path, manifest)
    out = np.empty((len(models), len(ids)), dtype=np.float64)
    computed = 0
    for m, (name, path) in enumerate(tqdm(models, desc="model outputs", unit="model", disable=not progress)):
        fp = read_json(Path(path) / "config.json", "checkpoint config").get("fingerprint", "")
        file = cache / f"{name}-{fp[:16]}.npy"
        if file.exists():
            out[m] = np.load(file)
            continue
        out[m] = adapter.outputs(adapter.load(path), examples, grid)
        write_npy_atomic(file, out[m], stage=f"model outputs of {name}",
                         cause="the retrained model diverged; check its training loss and retrain it")
        computed += 1
    return out, {**manifest, "path": str(cache), "computed_now": computed}


def store_examples(adapter: ModelAdapter, model_config: dict, store) -> Examples:
    """The examples a feature store was made from, in the store's row order (its conditioning if it has one)."""
    ex = adapter.examples(model_config, store.settings["source"], cache_dir=cache_dir_for(store.path))
    pos = {int(i): r for r, i in enumerate(ex.ids)}
    missing = [int(i) for i in store.ids if int(i) not in pos]
    if missing:
        raise UserError(f"feature store {store.path} has ids not in its source (e.g. {missing[0]}); featurize again")
    picked = ex.take([pos[int(i)] for i in store.ids])
    return dataclasses.replace(picked, ids=np.asarray(store.ids, dtype=np.int64), source=store.settings["source"],
                               cond=store.cond if store.cond is not None else picked.cond)
