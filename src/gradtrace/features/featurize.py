"""Featurize a set of examples into a resumable feature store.

    featurizer, groups = featurizer_for(adapter, checkpoint, spec)   # what the adapter differentiates
    store = featurize(featurizer, inputs, ids, out, spec=spec, cond=cond, model_fingerprint=..., source=...)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace.adapters.base import Checkpoint, ModelAdapter, Objective
from gradtrace.errors import UserError
from gradtrace.features.gradients import GradientFeaturizer
from gradtrace.features.groups import make_groups
from gradtrace.features.kron_projection import KIND as KRONECKER, KroneckerProjector
from gradtrace.features.kronecker import KroneckerFeaturizer
from gradtrace.features.projection import DEFAULT_TOTAL_DIM, GroupProjector
from gradtrace.features.store import FeatureStore, storage_dtype


@dataclass
class FeatureSpec:
    """Everything that decides the feature values besides the model and the examples."""

    groups: str = "block"
    projection: str = "rademacher"
    total_dim: int = DEFAULT_TOTAL_DIM
    projection_seed: int = 0
    measurement: str = "loss"
    num_timesteps: int = 10
    noise_seed: int = 0
    chunk_rows: int = 64
    dtype: str = "float32"  # storage: float32 | float16 | bfloat16 (scoring upcasts chunks to float32)
    precision: str = "float32"  # compute: float32 | bfloat16 forward and backward (gradients reach float32)


def build_featurizer(model: torch.nn.Module, objective: Objective, spec: FeatureSpec, preset_key=None,
                     adapter_presets: tuple[str, ...] = ()):
    """(featurizer, groups): GradientFeaturizer (vmap), or KroneckerFeaturizer for projection 'kronecker'.

    `preset_key` / `adapter_presets`: the adapter's own group presets (see `make_groups`)."""
    groups = make_groups(model, spec.groups, preset_key, adapter_presets)
    if spec.projection == KRONECKER:
        if spec.precision != "float32":
            raise UserError("the kronecker projection computes in float32; drop --dtype or use --projection "
                            "rademacher")
        projector = KroneckerProjector.create(model, groups, total_dim=spec.total_dim, seed=spec.projection_seed)
        return KroneckerFeaturizer(model, objective, groups, projector), groups
    named = dict(model.named_parameters())
    sizes = [sum(named[p].numel() for p in g.params) for g in groups]
    projector = GroupProjector.create(spec.projection, [g.name for g in groups], sizes,
                                      total_dim=spec.total_dim, seed=spec.projection_seed)
    return GradientFeaturizer(model, objective, groups, projector, precision=spec.precision), groups


def featurizer_for(adapter: ModelAdapter, checkpoint: Checkpoint, spec: FeatureSpec,
                   device: torch.device | None = None):
    """(featurizer, groups) of a checkpoint: its adapter's objective and group presets with `spec`; with
    `device`, the model and the objective compute there (features come back as CPU arrays)."""
    if device is not None and device.type != "cpu" and spec.projection == KRONECKER:
        raise UserError("the kronecker projection computes on the CPU; use --device cpu or --projection rademacher")
    if spec.measurement not in adapter.measurements:
        raise UserError(f"unknown measurement '{spec.measurement}' for {adapter.name} models; use one of "
                        f"{', '.join(adapter.measurements)}")
    objective = adapter.objective(checkpoint, spec.measurement, spec.num_timesteps, spec.noise_seed)
    if device is not None:
        checkpoint.model.to(device)
        objective.to(device)
    return build_featurizer(checkpoint.model, objective, spec, adapter.group_key, adapter.group_presets)


def store_settings(featurizer, spec: FeatureSpec, model_fingerprint: str,
                   source: dict) -> dict:
    slices, start = [], 0
    for g, size, k in zip(featurizer.groups, featurizer.sizes, featurizer.projector.dims):
        slices.append({"name": g.name, "start": start, "stop": start + k, "size": size,
                       "exact": featurizer.projector.is_exact(len(slices)), "params": list(g.params)})
        start += k
    settings = {"model_fingerprint": model_fingerprint, "groups_spec": spec.groups, "groups": slices,
                "projection": featurizer.projector.info(), "measurement": featurizer.objective.info(),
                "dtype": spec.dtype, "precision": spec.precision, "dim": start, "chunk_rows": int(spec.chunk_rows),
                "source": source, "spec": asdict(spec)}
    scale_info = featurizer.objective.row_scale_info()
    if scale_info is not None:
        settings["row_scale"] = scale_info
    return settings


def featurize(featurizer, inputs: torch.Tensor, ids, out, *, spec: FeatureSpec, cond=None,
              model_fingerprint: str, source: dict | None = None, provenance: dict | None = None,
              overwrite: bool = False, progress: bool = True, stop_after_chunks: int | None = None) -> FeatureStore:
    """Compute and store per-example features of `inputs` (ids and optional conditioning) with a featurizer
    built from `spec` (`featurizer_for` / `build_featurizer`).

    Resumes an unfinished store with the same settings; `stop_after_chunks` stops early (tests of
    resumption).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if inputs.shape[0] != len(ids):
        raise UserError(f"expected {len(ids)} examples (one per id), got inputs of shape {tuple(inputs.shape)}")
    if cond is not None and len(cond) != len(ids):
        raise UserError(f"got {len(cond)} conditioning rows for {len(ids)} examples")
    if spec.chunk_rows < 1:
        raise UserError(f"chunk size must be positive, got {spec.chunk_rows}")
    storage_dtype(spec.dtype)  # refuses an unknown storage dtype before any work
    settings = store_settings(featurizer, spec, model_fingerprint, source or {})
    store = FeatureStore.create(out, settings, ids, cond, provenance=provenance, overwrite=overwrite)
    try:
        return _fill(featurizer, store, inputs, ids, cond, spec, progress, stop_after_chunks)
    finally:
        store.release()


def _fill(featurizer, store, inputs, ids, cond, spec: FeatureSpec, progress: bool, stop_after_chunks) -> FeatureStore:
    if store.complete:
        return store
    n, step = len(ids), spec.chunk_rows
    start = store.rows_done
    bar = tqdm(total=n, initial=start, desc="featurize", unit="ex", disable=not progress)
    done_chunks = 0
    while start < n:
        stop = min(start + step, n)
        c = None if cond is None else cond[start:stop]
        block = featurizer.features(inputs[start:stop], ids[start:stop], c)
        scale = featurizer.objective.row_scale(featurizer.model, inputs[start:stop], ids[start:stop], c)
        store.write(start, block, scale)
        bar.update(stop - start)
        start = stop
        done_chunks += 1
        if stop_after_chunks is not None and done_chunks >= stop_after_chunks and start < n:
            bar.close()
            return store
    bar.close()
    store.finish()
    return store
