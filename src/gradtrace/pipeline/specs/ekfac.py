"""The EK-FAC stages' specs: the model, the examples scored, the factors, the damping c and the weight learner."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gradtrace.choices import (AUTO, DEFAULT_GUARD, DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_STEPS, EKFAC_DEFAULT_C,
                               GUARDS)
from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.specs.devices import device_option

FISHERS = ("auto", "true", "empirical")
GRID = 5  # values of c tried by --lambda-c auto: 1e-4 .. 1 (each one scores the learning queries once)


def _c_option(default):
    return option(default, f"damping δ = c · mean(Λ): a number >= 0, or 'auto' (the label-free SNR-best c of "
                           f"{GRID} values 1e-4..1 on learning queries); default: the weights' c, else {EKFAC_DEFAULT_C}",
                  type=str, check=lambda value, flag: parse_c(value))


@dataclass
class EkfacInputs(Spec):
    """What every EK-FAC command shares: the model, its training set's factors, the examples scored."""

    checkpoint: str = option(None, "checkpoint directory", required=True)
    ids: object = option(None, "file of the ids of the examples scored (held-out images, not training ones)",
                         type=str, required=True)
    data: str | None = option(None, "dataset of those ids: digits | shapes | imagefolder:PATH (default: the "
                              "checkpoint's)", type=str)
    n: int | None = option(None, "use the first N images of --data", type=int, check=positive)
    size: int | None = option(None, "image size (shapes, imagefolder)", type=int, check=positive)
    data_seed: int = option(0, "seed of a generated dataset (shapes)")
    groups: str = option("block", "module | an adapter preset (block) | 'name=regex,...' (whole modules per group)")
    measurement: str | None = option(None, "query-side measurement (default: the model's own, e.g. margin)",
                                     type=str)
    factors: str | None = option(None, "EK-FAC factors folder: fitted there once, reused when it matches "
                                 "(default: beside the output)", type=str)
    fisher: str = option("auto", "curvature: true (targets drawn from the model, when the loss can), empirical "
                         "(the training targets); auto = true where possible", choices=FISHERS)
    timesteps: int = option(10, "repeats averaged per example (diffusion timesteps)", check=positive)
    noise_seed: int = option(0, "seed of per-example draws (noise; sampled Fisher targets)")
    batch_size: int = option(64, "examples per kronfluence batch", check=positive)
    device: str = device_option()


@dataclass
class AttributeEkfacSpec(EkfacInputs):
    out: str = option(None, "output directory", required=True)
    top_k: int = option(10, "training examples kept per query", check=positive)
    weights: str | None = option(None, "group weights: a learn-weights-ekfac file, or {\"weights\": {group: w}}",
                                 type=str)
    lambda_c: str | float | None = _c_option(None)
    learning_ids: object = option(None, "with --lambda-c auto: ids of learning queries (never the --ids)", type=str)


@dataclass
class LearnWeightsEkfacSpec(EkfacInputs):
    out: str = option(None, "weights JSON to write", required=True)
    lambda_c: str | float | None = _c_option(AUTO)
    k: int = option(DEFAULT_K, "top-k of the objective", check=positive)
    steps: int = option(DEFAULT_STEPS, "optimiser steps", check=positive)
    lr: float = option(DEFAULT_LR, "AdamW learning rate on θ")
    l2: float = option(DEFAULT_L2, "λ‖w‖² penalty")
    guard: str = option(DEFAULT_GUARD, "holdout: shrink the weights towards uniform as far as their gain does not "
                        "carry over to held-out learning queries", choices=GUARDS)


def parse_c(value):
    """None, "auto" or a float >= 0; anything else refused in one line."""
    if value is None or str(value).strip().lower() == AUTO:
        return None if value is None else AUTO
    try:
        c = float(value)
    except (TypeError, ValueError):
        c = float("nan")
    if not math.isfinite(c) or c < 0:
        raise UserError(f"--lambda-c must be a number >= 0 or 'auto', got {value!r}")
    return c
