"""The check-captions stage's spec: how well a text-to-image model renders its training captions."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import DEFAULT_GUIDANCE
from gradtrace.pipeline.spec import Spec, option, positive

DEFAULT_CAPTIONS = 32


@dataclass
class CheckCaptionsSpec(Spec):
    checkpoint: str = option(None, "a text-to-image pipeline folder (e.g. from build-pipeline) or a LoRA run",
                             required=True)
    data: str | None = option(None, "captioned training data (default: what the model was built or trained on)",
                              type=str)
    n: int | None = option(None, "with --data: use its first N images", type=int, check=positive)
    data_seed: int = option(0, "with --data: seed of a generated dataset (shapes)")
    captions: int = option(DEFAULT_CAPTIONS, "distinct training captions to prompt with (drawn from --seed)",
                           check=positive)
    per_caption: int = option(2, "images generated per caption", check=positive)
    sample_steps: int = option(10, "DDIM steps per image", check=positive)
    guidance: float = option(DEFAULT_GUIDANCE, "classifier-free guidance scale (the sample stage's default)")
    seed: int = option(0, "seed of the caption draw and of sampling")
    out: str | None = option(None, "also write the result as JSON to this file", type=str)
