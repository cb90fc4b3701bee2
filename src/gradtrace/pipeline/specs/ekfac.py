"""The specs of the deprecated EK-FAC aliases (`attribute-ekfac`, `learn-weights-ekfac`): `attribute --method ekfac`'s
and `learn-weights --method ekfac`'s options under their former names."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import (
    AUTO,
    DEFAULT_GUARD,
    DEFAULT_K,
    DEFAULT_L2,
    DEFAULT_LR,
    DEFAULT_STEPS,
    EKFAC_DEFAULT_C,
    EKFAC_GRID,
    GUARDS,
    parse_c,
)
from gradtrace.pipeline.spec import option, positive
from gradtrace.pipeline.specs.model_inputs import ModelInputs

GRID = EKFAC_GRID  # values of c tried by --lambda-c auto: 1e-4 .. 1


def _c_option(default):
    return option(default, f"damping δ = c · mean(Λ): a number >= 0, or 'auto' (the label-free SNR-best c of "
                           f"{GRID} values 1e-4..1 on learning queries); default: the weights' c, else "
                           f"{EKFAC_DEFAULT_C}",
                  type=str, check=lambda value, flag: parse_c(value))


@dataclass
class EkfacInputs(ModelInputs):
    """What every EK-FAC alias shares: the model, its training set's factors, the examples scored."""

    checkpoint: str = option(None, "checkpoint directory", required=True)
    ids: object = option(None, "file of the ids of the examples scored (held-out images, not training ones)",
                         type=str, required=True)


@dataclass
class AttributeEkfacSpec(EkfacInputs):
    out: str = option(None, "output directory", required=True)
    top_k: int = option(10, "training examples kept per query", check=positive)
    weights: str | None = option(None, "group weights: a learn-weights file, or {\"weights\": {group: w}}", type=str)
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
                        "carry over to held-out learning queries; auto: holdout from 4 learning examples up; none: "
                        "as learned", choices=GUARDS)
