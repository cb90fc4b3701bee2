"""The inputs of a method that needs the model (EK-FAC): the checkpoint, the examples scored, the method's settings
(`attribute`, `learn-weights` and their EK-FAC aliases share them)."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import FISHERS
from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.specs.devices import device_option

MODEL_ONLY = "(methods that need the model, e.g. ekfac)"


@dataclass
class ModelInputs(Spec):
    """The inputs of a method that needs the model: the checkpoint, the examples scored, the method's settings."""

    checkpoint: str | None = option(None, f"checkpoint directory {MODEL_ONLY}", type=str)
    ids: object = option(None, f"file of the ids of the examples scored (held-out examples, not training ones) "
                         f"{MODEL_ONLY}", type=str)
    data: str | None = option(None, "dataset of those ids: digits | shapes | imagefolder:PATH | jsonl:PATH ... "
                              "(default: the checkpoint's)", type=str)
    n: int | None = option(None, "use the first N examples of --data", type=int, check=positive)
    size: int | None = option(None, "image size (shapes, imagefolder)", type=int, check=positive)
    data_seed: int = option(0, "seed of a generated dataset (shapes)")
    groups: str = option("block", f"module | an adapter preset (block) | 'name=regex,...' (whole modules per group) "
                         f"{MODEL_ONLY}")
    measurement: str | None = option(None, "query-side measurement (default: the model's own, e.g. margin)",
                                     type=str)
    factors: str | None = option(None, "EK-FAC factors folder: fitted there once, reused when it matches "
                                 "(default: beside the output)", type=str)
    fisher: str = option("auto", "EK-FAC curvature: true (targets drawn from the model, when the loss can), "
                         "empirical (the training targets); auto = true where possible", choices=FISHERS)
    timesteps: int = option(10, "repeats averaged per example (diffusion timesteps)", check=positive)
    noise_seed: int = option(0, "seed of per-example draws (noise; sampled Fisher targets)")
    batch_size: int = option(64, "examples per batch of the method's engine", check=positive)
    device: str = device_option()

    def check_model_inputs(self, method_name: str) -> None:
        if self.checkpoint is None or self.ids is None:
            raise UserError(f"method '{method_name}' scores the model directly: pass --checkpoint RUN and --ids FILE")
