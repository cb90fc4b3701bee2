"""The featurize stage: per-example projected gradient features of a dataset or a samples directory."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from gradtrace.adapters import adapter_of
from gradtrace.data.sources import dataset_source
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for
from gradtrace.features.store import FeatureStore, cache_dir_for
from gradtrace.io import command_line
from gradtrace.pipeline.devices import resolve_device
from gradtrace.pipeline.specs.featurize import FeaturizeSpec
from gradtrace.pipeline.train import resolve_ids


def feature_spec(spec: FeaturizeSpec) -> FeatureSpec:
    """The feature settings of a featurize spec (what the store records and checks)."""
    return FeatureSpec(groups=spec.groups, projection=spec.projection, total_dim=spec.dim,
                       projection_seed=spec.proj_seed, measurement=spec.measurement, num_timesteps=spec.timesteps,
                       noise_seed=spec.noise_seed, chunk_rows=spec.chunk, dtype=spec.store_dtype, precision=spec.dtype,
                       timestep_bands=spec.timestep_bands)


def featurize_run(spec: FeaturizeSpec, *, progress: bool = True) -> FeatureStore:
    """Featurize the examples of `spec` (default: the checkpoint's own training data and ids)."""
    adapter = adapter_of(spec.checkpoint)
    if spec.measurement is None:  # the model's own default, recorded in the store's spec
        spec = replace(spec, measurement=adapter.default_measurement)
    ckpt = adapter.load(spec.checkpoint)
    ids = resolve_ids(spec.ids)
    if spec.samples:
        source = {"kind": "samples", "path": str(spec.samples)}
    elif spec.data:
        source = dataset_source(spec.data, n=spec.n, size=spec.size, seed=spec.data_seed)
    else:
        source = (ckpt.config.get("dataset") or {}).get("source")
        if not source or not source.get("spec"):
            raise UserError("the checkpoint does not record its dataset; pass --data")
        if ids is None:
            ids = ckpt.train_ids
    examples = adapter.examples(ckpt.model_config, source, ids=ids, cache_dir=cache_dir_for(spec.out))
    if spec.condition_on is not None:
        examples = conditioned_on(examples, ckpt.model_config, spec.condition_on)
    features = feature_spec(spec)
    device = resolve_device(spec.device)
    featurizer, _ = featurizer_for(adapter, ckpt, features, device=device)
    provenance = {"command": command_line(), "checkpoint": str(Path(spec.checkpoint).resolve()),
                  "adapter": adapter.name, "device": str(device), "spec": spec.to_dict()}
    return featurize(featurizer, examples.images, examples.ids, spec.out, spec=features, cond=examples.cond,
                     model_fingerprint=ckpt.fingerprint, source=examples.source, provenance=provenance,
                     overwrite=spec.overwrite, progress=progress, allow_mixed_numerics=spec.allow_mixed_numerics)


def conditioned_on(examples, model_config: dict, attribute: str):
    """The examples with every attribute token but `attribute`'s null (-1; "none": all null); recorded in their
    source."""
    names = list(model_config.get("attributes") or {}) if model_config.get("kind") == "conditional" else []
    if not names or examples.cond is None or np.ndim(examples.cond) != 2:
        raise UserError("--condition-on needs a model conditioned on attribute tokens (a conditional UNet); "
                        "drop --condition-on")
    if attribute not in names and attribute != "none":
        raise UserError(f"--condition-on {attribute}: the model's attributes are {', '.join(names)}; pick one "
                        "(or none)")
    cond = np.full_like(np.asarray(examples.cond), -1)
    if attribute != "none":
        cond[:, names.index(attribute)] = np.asarray(examples.cond)[:, names.index(attribute)]
    return replace(examples, cond=cond, source={**examples.source, "condition_on": attribute})
