"""The featurize stage: per-example projected gradient features of a dataset or a samples directory."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gradtrace.adapters import adapter_of
from gradtrace.data.sources import dataset_source
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for
from gradtrace.features.projection import DEFAULT_PROJECTION, KINDS
from gradtrace.features.store import DTYPES, FeatureStore, cache_dir_for
from gradtrace.io import command_line
from gradtrace.pipeline.devices import device_option, dtype_option, resolve_device
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.train import resolve_ids


@dataclass
class FeaturizeSpec(Spec):
    checkpoint: str = option(None, "checkpoint directory", required=True)
    out: str = option(None, "feature store directory", required=True)
    data: str | None = option(None, "digits | shapes | imagefolder:PATH | jsonl:PATH | textfolder:PATH | fortunes "
                              "(default: the checkpoint's training data)",
                              type=str)
    samples: str | None = option(None, "featurize a samples directory instead of a dataset", type=str)
    n: int | None = option(None, "use the first N images of the dataset", type=int, check=positive)
    size: int | None = option(None, "image size (shapes, imagefolder)", type=int, check=positive)
    data_seed: int = option(0, "seed of a generated dataset (shapes)")
    ids: object = option(None, "file of example ids to use (.npy, .json or one per line)", type=str)
    groups: str = option("block", "tensor | module | an adapter preset (block) | 'name=regex,...;name2=regex'")
    projection: str = option(DEFAULT_PROJECTION, "projection of each group's gradient", choices=KINDS)
    dim: int | None = option(None, "total projection dimension (default 8192 for kronecker, 2048 otherwise)",
                             type=int, check=positive)
    proj_seed: int = option(0, "projection seed")
    measurement: str | None = option(None, "what is differentiated (default: the model's own: loss for diffusion "
                                     "models, of loss, dtrak, mean, das; margin for classifiers, of margin, loss)",
                                     type=str)
    timesteps: int = option(10, "T timesteps averaged per example", check=positive)
    timestep_bands: int | None = option(None, "diffusion models: split the T timesteps into N bands (3: high / mid / "
                                        "low noise) and store one block per (parameter group x band), so that "
                                        "kernels and weights work per band (the store holds N times --dim columns)",
                                        type=int, check=positive)
    noise_seed: int = option(0, "seed of the per-example noise")
    condition_on: str | None = option(None, "attribute-conditioned models: featurize every example conditioned on "
                                      "this attribute's token alone, the other attributes' tokens null (e.g. a "
                                      "query's style only); none: every token null (the image alone)", type=str)
    chunk: int = option(64, "examples per chunk", check=positive)
    store_dtype: str = option("float32", "storage dtype of the features", choices=DTYPES)
    overwrite: bool = option(False, "replace a store made with other settings")
    device: str = device_option()
    dtype: str = dtype_option()

    def validate(self) -> None:
        if self.data and self.samples:
            raise UserError("pass either --data or --samples, not both")
        if self.samples and self.ids is not None:
            raise UserError("--ids selects dataset examples; it cannot be used with --samples")
        if not self.data and (self.n is not None or self.size is not None):
            raise UserError("--n and --size select and shape dataset images; pass --data too (without it the "
                            "checkpoint's own training images are featurized as they were trained)")

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(groups=self.groups, projection=self.projection, total_dim=self.dim,
                           projection_seed=self.proj_seed, measurement=self.measurement,
                           num_timesteps=self.timesteps, noise_seed=self.noise_seed, chunk_rows=self.chunk,
                           dtype=self.store_dtype, precision=self.dtype, timestep_bands=self.timestep_bands)

    @classmethod
    def like(cls, settings: dict, **where) -> "FeaturizeSpec":
        """A spec that featurizes more examples exactly as a store was made (`settings` = its settings)."""
        s = settings["spec"]
        return cls(groups=s["groups"], projection=s["projection"], dim=s["total_dim"], proj_seed=s["projection_seed"],
                   measurement=s["measurement"], timesteps=s["num_timesteps"], noise_seed=s["noise_seed"],
                   chunk=s["chunk_rows"], store_dtype=s["dtype"], dtype=s.get("precision", "float32"),
                   timestep_bands=s.get("timestep_bands"), **where)


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
    features = spec.feature_spec()
    device = resolve_device(spec.device)
    featurizer, _ = featurizer_for(adapter, ckpt, features, device=device)
    provenance = {"command": command_line(), "checkpoint": str(Path(spec.checkpoint).resolve()),
                  "adapter": adapter.name, "device": str(device), "spec": spec.to_dict()}
    return featurize(featurizer, examples.images, examples.ids, spec.out, spec=features, cond=examples.cond,
                     model_fingerprint=ckpt.fingerprint, source=examples.source, provenance=provenance,
                     overwrite=spec.overwrite, progress=progress)


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
