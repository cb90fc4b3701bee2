"""The featurize stage's spec: which examples, which model, and how their gradients are projected and stored."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import DEFAULT_PROJECTION, PROJECTIONS, STORE_DTYPES
from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.specs.devices import device_option, dtype_option


@dataclass
class FeaturizeSpec(Spec):
    checkpoint: str = option(None, "checkpoint directory", required=True)
    out: str = option(None, "feature store directory", required=True)
    data: str | None = option(None, "digits | shapes | imagefolder:PATH | hf:PATH | jsonl:PATH | textfolder:PATH | "
                              "fortunes (default: the checkpoint's training data)",
                              type=str)
    samples: str | None = option(None, "featurize a samples directory instead of a dataset", type=str)
    n: int | None = option(None, "use the first N images of the dataset", type=int, check=positive)
    size: int | None = option(None, "image size (shapes, imagefolder)", type=int, check=positive)
    data_seed: int = option(0, "seed of a generated dataset (shapes)")
    ids: object = option(None, "file of example ids to use (.npy, .json or one per line)", type=str)
    groups: str = option("block", "tensor | module | an adapter preset (block) | 'name=regex,...;name2=regex'")
    projection: str = option(DEFAULT_PROJECTION, "projection of each group's gradient", choices=PROJECTIONS)
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
    store_dtype: str = option("float32", "storage dtype of the features", choices=STORE_DTYPES)
    overwrite: bool = option(False, "replace a store made with other settings")
    allow_mixed_numerics: bool = option(False, "let this run add rows computed under other numerics (thread count, "
                                        "device, dtype, library versions) than the store's other rows; recorded in "
                                        "its manifest (its bytes then differ from a clean run's)")
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

    @classmethod
    def like(cls, settings: dict, **where) -> "FeaturizeSpec":
        """A spec that featurizes more examples exactly as a store was made (`settings` = its settings), under the
        same conditioning (`--condition-on`)."""
        s = settings["spec"]
        where.setdefault("condition_on", (settings.get("source") or {}).get("condition_on"))
        return cls(groups=s["groups"], projection=s["projection"], dim=s["total_dim"], proj_seed=s["projection_seed"],
                   measurement=s["measurement"], timesteps=s["num_timesteps"], noise_seed=s["noise_seed"],
                   chunk=s["chunk_rows"], store_dtype=s["dtype"], dtype=s.get("precision", "float32"),
                   timestep_bands=s.get("timestep_bands"), **where)
