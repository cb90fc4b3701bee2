"""The feature-kernel base methods by name (TracIn, TRAK, D-TRAK, DAS; LoGra is TRAK's per-group kernel on
Kronecker features), `configure` with the stages' settings, and the λ-scale grid used by the label-free choice of
c. EK-FAC scores the model directly (`methods/ekfac.py`)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradtrace.errors import UserError
from gradtrace.methods.base import Method
from gradtrace.methods.tracin import TracIn
from gradtrace.methods.trak import DEFAULT_C, DEFAULT_KERNEL, TRAK


def _tracin(**kwargs: Any) -> Method:
    if kwargs:
        raise UserError(f"method 'tracin' takes no options, got: {', '.join(sorted(kwargs))}; drop them")
    return TracIn()


def _trak_named(name: str, required_measurement: str | None = None,
                needs_row_scale: bool = False) -> Callable[..., Method]:
    def make(**kwargs: Any) -> Method:
        allowed = {"c", "kernel"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise UserError(f"method '{name}' does not take {', '.join(unknown)}; its options are: c, kernel")
        return TRAK(**kwargs, name=name, required_measurement=required_measurement, needs_row_scale=needs_row_scale)

    return make


# "dtrak" is the TRAK kernel applied to D-TRAK features (gradients of mean(out**2)); the feature code
# differs, not the kernel, so the method requires that measurement. The name is recorded in FittedMethod.info.
# "das" (Diffusion Attribution Score, Lin et al., ICLR 2025) is the same kernel on gradients of the mean
# output, each training example's scores multiplied by its residual factor e_n (kept in the store):
#     τ(q, n) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_n) · e_n          (per group with the per-group kernel)
METHODS: dict[str, Callable[..., Method]] = {
    "tracin": _tracin,
    "trak": _trak_named("trak"),
    "dtrak": _trak_named("dtrak", required_measurement="dtrak"),
    "das": _trak_named("das", required_measurement="das", needs_row_scale=True),
}


def known_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str, **kwargs: Any) -> Method:
    """A base method by name: "tracin", "trak", "dtrak" or "das" (options for the last three: c, kernel)."""
    key = str(name).strip().lower().replace("_", "-")
    key = {"d-trak": "dtrak", "grad-dot": "tracin", "graddot": "tracin"}.get(key, key)
    if key not in METHODS:
        raise UserError(f"unknown method '{name}'; use one of: {', '.join(METHODS)}")
    return METHODS[key](**kwargs)


def configure(name: str, *, kernel: str = DEFAULT_KERNEL, c: float = DEFAULT_C) -> Method:
    """A base method with the stages' settings: `kernel` and `c` go to the methods that have a λ, the
    others take none (so callers never test method names)."""
    method = get_method(name)
    return get_method(name, kernel=kernel, c=c) if method.uses_lambda else method


def lambda_grid(num: int = 9, low: float = 1e-4, high: float = 1.0) -> np.ndarray:
    """Log-spaced values of c (λ = c · mean diag of the Gram) from `low` to `high`; default 1e-4..1, 9 points."""
    if int(num) != num or num < 1:
        raise UserError(f"num must be a positive integer, got {num!r}")
    if not (0 < low <= high):
        raise UserError(f"need 0 < low <= high for a log grid, got low={low}, high={high}")
    return np.logspace(np.log10(low), np.log10(high), int(num))
