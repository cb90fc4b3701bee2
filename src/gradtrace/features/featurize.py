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
from gradtrace.features.bands import BandedFeaturizer, BandedObjective
from gradtrace.features.gradients import GradientFeaturizer
from gradtrace.features.groups import make_groups
from gradtrace.features.kron_projection import KIND as KRONECKER, KroneckerProjector
from gradtrace.features.kronecker import KroneckerFeaturizer
from gradtrace.features.numerics import current
from gradtrace.features.progress import is_progress_file
from gradtrace.features.projection import DEFAULT_PROJECTION, GroupProjector, default_dim
from gradtrace.features.store import OWN_FILES, FeatureStore, storage_dtype
from gradtrace.ranks import rank_and_world


@dataclass
class FeatureSpec:
    """Everything that decides the feature values besides the model and the examples."""

    groups: str = "block"
    projection: str = DEFAULT_PROJECTION
    total_dim: int | None = None  # None: default_dim(projection)
    projection_seed: int = 0
    measurement: str = "loss"
    num_timesteps: int = 10
    noise_seed: int = 0
    chunk_rows: int = 64
    dtype: str = "float32"  # storage: float32 | float16 | bfloat16 (scoring upcasts chunks to float32)
    precision: str = "float32"  # compute: float32 | bfloat16 forward and backward (gradients reach float32)
    timestep_bands: int | None = None  # diffusion: one block per (group × band of timesteps); None = no bands

    def __post_init__(self) -> None:
        if self.total_dim is None:
            self.total_dim = default_dim(self.projection)


def build_featurizer(model: torch.nn.Module, objective: Objective, spec: FeatureSpec, preset_key=None,
                     adapter_presets: tuple[str, ...] = ()):
    """(featurizer, groups): GradientFeaturizer (vmap), or KroneckerFeaturizer for projection 'kronecker'.

    `preset_key` / `adapter_presets`: the adapter's own group presets (see `make_groups`)."""
    groups = make_groups(model, spec.groups, preset_key, adapter_presets)
    if spec.timestep_bands is not None:  # one featurizer per band, all sharing the groups' projections
        bands = objective.timestep_bands(spec.timestep_bands)
        first, _ = _featurizer(model, bands[0][1], spec, groups)
        parts = [first] + [_featurizer(model, obj, spec, groups, first.projector)[0] for _, obj in bands[1:]]
        return BandedFeaturizer(parts, [name for name, _ in bands], BandedObjective(objective, bands)), groups
    return _featurizer(model, objective, spec, groups)


def _featurizer(model, objective, spec: FeatureSpec, groups, projector=None):
    if spec.projection == KRONECKER:
        if spec.precision != "float32":
            raise UserError("the kronecker projection computes in float32; drop --dtype or use --projection "
                            "rademacher")
        if projector is None:
            projector = KroneckerProjector.create(model, groups, total_dim=spec.total_dim, seed=spec.projection_seed)
        return KroneckerFeaturizer(model, objective, groups, projector), groups
    if projector is None:
        named = dict(model.named_parameters())
        sizes = [sum(named[p].numel() for p in g.params) for g in groups]
        projector = GroupProjector.create(spec.projection, [g.name for g in groups], sizes,
                                          total_dim=spec.total_dim, seed=spec.projection_seed)
    return GradientFeaturizer(model, objective, groups, projector, precision=spec.precision), groups


def featurizer_for(adapter: ModelAdapter, checkpoint: Checkpoint, spec: FeatureSpec,
                   device: torch.device | None = None):
    """(featurizer, groups) of a checkpoint: its adapter's objective and group presets with `spec`; with
    `device`, the model and the objective compute there (features come back as CPU arrays)."""
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
                "source": source, "spec": spec_record(spec)}
    scale_info = featurizer.objective.row_scale_info()
    if scale_info is not None:
        settings["row_scale"] = scale_info
    return settings


def spec_record(spec: FeatureSpec) -> dict:
    """The spec as a store records it; without bands, exactly as before bands existed (so stores made by earlier
    versions are reopened and resumed as the same settings)."""
    record = asdict(spec)
    if record.get("timestep_bands") is None:
        del record["timestep_bands"]
    return record


def featurize(featurizer, inputs: torch.Tensor, ids, out, *, spec: FeatureSpec, cond=None,
              model_fingerprint: str, source: dict | None = None, provenance: dict | None = None,
              overwrite: bool = False, progress: bool = True, stop_after_chunks: int | None = None,
              rank: int | None = None, world: int | None = None, allow_mixed_numerics: bool = False) -> FeatureStore:
    """Compute and store per-example features of `inputs` (ids and optional conditioning) with a featurizer
    built from `spec` (`featurizer_for` / `build_featurizer`).

    Resumes an unfinished store with the same settings. `rank` of `world` writers (default: torchrun's RANK and
    WORLD_SIZE, else 0 of 1) computes the chunks c with c % world == rank that nobody has recorded; the writer
    that finds every chunk recorded finishes the store (the others return it unfinished). `stop_after_chunks`
    stops early (tests of resumption). Every chunk records the numerics it was computed under; a store whose
    other chunks were computed under others is refused unless `allow_mixed_numerics` (`features.numerics`).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if inputs.shape[0] != len(ids):
        raise UserError(f"expected {len(ids)} examples (one per id), got inputs of shape {tuple(inputs.shape)}")
    if cond is not None and len(cond) != len(ids):
        raise UserError(f"got {len(cond)} conditioning rows for {len(ids)} examples")
    if spec.chunk_rows < 1:
        raise UserError(f"chunk size must be positive, got {spec.chunk_rows}")
    storage_dtype(spec.dtype)  # refuses an unknown storage dtype before any work
    if rank is None or world is None:
        rank, world = rank_and_world()
    settings = store_settings(featurizer, spec, model_fingerprint, source or {})
    device = next((p.device for p in getattr(featurizer, "model", torch.nn.Module()).parameters()), None)
    store = FeatureStore.create(out, settings, ids, cond, provenance=provenance, overwrite=overwrite, rank=rank,
                                world=world, numerics=current(device, spec.precision),
                                allow_mixed_numerics=allow_mixed_numerics)
    try:
        return _fill(featurizer, store, inputs, ids, cond, progress, stop_after_chunks, rank, world)
    except UserError:
        if world == 1 and not store.progress.done():  # refused before any row was kept: leave nothing behind
            _discard(store)
        raise
    finally:
        store.release()


def _discard(store: FeatureStore) -> None:
    """Remove the files of a store no chunk of which was written (and its folder, if this writer made it)."""
    for file in list(store.path.iterdir()):
        if file.name in OWN_FILES or is_progress_file(file.name) or file.name.startswith(".lock"):
            file.unlink(missing_ok=True)
    if not getattr(store, "folder_existed", True) and not any(store.path.iterdir()):
        store.path.rmdir()


def _fill(featurizer, store, inputs, ids, cond, progress: bool, stop_after_chunks, rank: int,
          world: int) -> FeatureStore:
    if store.complete:
        return store
    bounds = store.progress.bounds
    done = store.progress.done()
    todo = [c for c in range(len(bounds)) if c % world == rank and c not in done]
    label = "featurize" if world == 1 else f"featurize (rank {rank}/{world})"
    rows = sum(bounds[c][1] - bounds[c][0] for c in range(len(bounds)) if c % world == rank)
    bar = tqdm(total=rows, initial=rows - sum(bounds[c][1] - bounds[c][0] for c in todo), desc=label, unit="ex",
               disable=not progress)
    for n_done, c in enumerate(todo, start=1):
        start, stop = bounds[c]
        part = None if cond is None else cond[start:stop]
        block = featurizer.features(inputs[start:stop], ids[start:stop], part)
        scale = featurizer.objective.row_scale(featurizer.model, inputs[start:stop], ids[start:stop], part)
        store.write(start, block, scale)
        bar.update(stop - start)
        if stop_after_chunks is not None and n_done >= stop_after_chunks and n_done < len(todo):
            bar.close()
            return store
    bar.close()
    store.finish()
    return store
