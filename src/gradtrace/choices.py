"""The named choices and defaults the stages offer (method names, kernels, the λ rule, the weight learner's
defaults, projections, dtypes, devices), defined once below every layer.

The stage specs (`gradtrace.pipeline.specs`) build the CLI's options from these without importing torch, so
`gradtrace --help` and a refusal of a bad argument take a fraction of a second; the modules that implement a
choice import its names from here (`gradtrace.methods.KERNELS` is `KERNELS`), so there is one definition of each.
This module imports nothing heavier than `gradtrace.errors`.
"""
from __future__ import annotations

import math
from typing import Any

from gradtrace.errors import UserError

# -- base methods (gradtrace.methods): the built-in names, and those that score the model directly (needs_model);
# `gradtrace.methods.register_method` adds a new one here too (`--method` then offers it). A test checks both agree.
METHODS = ("tracin", "trak", "dtrak", "das", "ekfac")
_NAMES: dict[str, bool] = {name: name == "ekfac" for name in METHODS}  # name -> needs_model


def add_method_name(name: str, needs_model: bool) -> None:
    """Offer a method registered after start-up (called by `gradtrace.methods.register_method`)."""
    _NAMES[name] = bool(needs_model)


def needs_model(name: str) -> bool:
    """Whether the method of that name scores the model directly (no feature stores); unknown names: False (the
    spec's choices refuse them)."""
    return _NAMES.get(str(name).strip().lower(), False)


class MethodNames:
    """The offered method names, read when used (a method registered later is offered too): argparse's and the
    spec's `choices`."""

    def __iter__(self):
        return iter(list(_NAMES))

    def __contains__(self, name) -> bool:
        return name in _NAMES

    def __len__(self) -> int:
        return len(_NAMES)


KERNELS = ("shared", "per-group")
# The kernel every stage uses unless told otherwise (the bare `TRAK` class keeps the textbook shared one):
# per-group beat shared for TRAK and D-TRAK in both benchmarks (docs/benchmarks.md).
DEFAULT_KERNEL = "per-group"
DEFAULT_C = 0.01  # the TRAK λ scale (see gradtrace.methods.trak)
EKFAC_DEFAULT_C = 0.1  # the EK-FAC damping scale (see gradtrace.methods.ekfac)
EKFAC_GRID = 5  # values of c the EK-FAC --lambda-c auto tries, 1e-4 .. 1 (gradtrace.methods.ekfac_method)
FISHERS = ("auto", "true", "empirical")  # EK-FAC's curvature (gradtrace.methods.ekfac_method)
AUTO = "auto"  # --lambda-c auto: the label-free SNR-best c on learning queries


def check_c(c: Any) -> float:
    """The one rule for a λ scale c: a finite number >= 0 (0 = no damping: the pseudo-inverse of the Gram)."""
    try:
        value = float(c)
    except (TypeError, ValueError):
        raise UserError(f"c must be a number, got {c!r}; pass e.g. c={DEFAULT_C}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"c must be finite and >= 0, got {c}; pass e.g. c={DEFAULT_C}")
    return value


def parse_c(value) -> float | str | None:
    """None, "auto" or a float >= 0 (the one rule for --lambda-c); anything else is refused in one line."""
    if value is None:
        return None
    if str(value).strip().lower() == AUTO:
        return AUTO
    try:
        return check_c(value)
    except UserError:
        raise UserError(f"--lambda-c must be a number or 'auto' (numbers: finite, >= 0), got {value!r}") from None


# -- sampling: one default guidance for `sample` and for `learn-weights --generate` (learning and evaluation queries
# sampled alike unless asked otherwise; the weights file records the learning queries' guidance, `attribute` warns
# when the queries it scores were sampled with another)
DEFAULT_GUIDANCE = 1.0

# -- the weight learner (gradtrace.weights.defaults says why these values)
DEFAULT_K = 10
DEFAULT_STEPS = 200
DEFAULT_LR = 0.05
DEFAULT_L2 = 0.0
DEFAULT_GUARD = "auto"  # the stages' default: the holdout guard wherever the learning queries can be halved
GUARDS = ("auto", "none", "holdout")

# -- features (gradtrace.features): projections of each group's gradient, storage dtypes
PROJECTIONS = ("rademacher", "gaussian", "identity", "kronecker")  # kronecker: see kron_projection.py
DEFAULT_PROJECTION = "kronecker"
STORE_DTYPES = ("float32", "float16", "bfloat16")

# -- where and at what precision a model runs (gradtrace.precision, gradtrace.pipeline.devices)
PRECISIONS = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_ADAPTER = "diffusion-unet"  # checkpoints without an "adapter" key: the tiny diffusion UNets

# -- evaluation (gradtrace.metrics.detection, gradtrace.metrics.stats, gradtrace.evaluate.mislabel)
N_BOOTSTRAP = 1000
TOP_FRACTION = 0.1
MISLABEL_METHODS = "tracin,trak:shared,trak:per-group"


def check_fraction(value, flag: str = "--fraction") -> float:
    """A fraction strictly between 0 and 1."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a number strictly between 0 and 1, got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"{flag} must be strictly between 0 and 1, got {value:g}")
    return value
