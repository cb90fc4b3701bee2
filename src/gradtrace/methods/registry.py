"""Base methods by name: the feature kernels (TracIn, TRAK, D-TRAK, DAS; LoGra is TRAK's per-group kernel on
Kronecker features) and the methods that need the model (EK-FAC), `configure` with the stages' settings, and
`register_method` for a new one (docs/architecture.md, "Adding a base method")."""
from __future__ import annotations

from typing import Any, Callable

from gradtrace.choices import MethodNames, add_method_name  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.methods.base import BaseMethod, lambda_grid
from gradtrace.methods.ekfac_method import Ekfac
from gradtrace.methods.tracin import TracIn
from gradtrace.methods.trak import DEFAULT_C, DEFAULT_KERNEL, TRAK

__all__ = ["METHODS", "MethodNames", "configure", "get_method", "known_methods", "lambda_grid", "register_method"]


def _tracin(**kwargs: Any) -> BaseMethod:
    if kwargs:
        raise UserError(f"method 'tracin' takes no options, got: {', '.join(sorted(kwargs))}; drop them")
    return TracIn()


def _trak_named(name: str, required_measurement: str | None = None,
                needs_row_scale: bool = False) -> Callable[..., BaseMethod]:
    def make(**kwargs: Any) -> BaseMethod:
        allowed = {"c", "kernel"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise UserError(f"method '{name}' does not take {', '.join(unknown)}; its options are: c, kernel")
        return TRAK(**kwargs, name=name, required_measurement=required_measurement, needs_row_scale=needs_row_scale)

    return make


def _model_method(cls: type) -> Callable[..., BaseMethod]:
    """A factory of a dataclass `ModelMethod`: its fields are its options."""
    def make(**kwargs: Any) -> BaseMethod:
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise UserError(f"method '{cls.name}': {exc}") from None

    return make


# "dtrak" is the TRAK kernel applied to D-TRAK features (gradients of mean(out**2)); the feature code
# differs, not the kernel, so the method requires that measurement. The name is recorded in FittedMethod.info.
# "das" (Diffusion Attribution Score, Lin et al., ICLR 2025) is the same kernel on gradients of the mean
# output, each training example's scores multiplied by its residual factor e_n (kept in the store):
#     τ(q, n) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_n) · e_n          (per group with the per-group kernel)
# "ekfac" works on the model directly (kronfluence), no feature store.
METHODS: dict[str, Callable[..., BaseMethod]] = {
    "tracin": _tracin,
    "trak": _trak_named("trak"),
    "dtrak": _trak_named("dtrak", required_measurement="dtrak"),
    "das": _trak_named("das", required_measurement="das", needs_row_scale=True),
    "ekfac": _model_method(Ekfac),
}


def _needs_model_of(factory: Callable[..., BaseMethod]) -> bool:
    """Whether a factory's method needs the model (asked of a default instance; False when it needs options)."""
    try:
        return bool(factory().needs_model)
    except (TypeError, UserError):  # a factory that needs options: the stages ask the method when they run
        return False


def register_method(name: str, factory: Callable[..., BaseMethod]) -> None:
    """Make `factory(**options)` the base method called `name` (every stage and `--method` then offer it)."""
    key = str(name).strip().lower()
    if key in METHODS:
        raise UserError(f"a method called '{name}' exists already; choose another name")
    METHODS[key] = factory
    add_method_name(key, getattr(factory, "needs_model", False) or _needs_model_of(factory))


def known_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str, **kwargs: Any) -> BaseMethod:
    """A base method by name: "tracin", "trak", "dtrak", "das" (options of the last three: c, kernel) or "ekfac"
    (options: the fields of `gradtrace.methods.ekfac_method.Ekfac`)."""
    key = str(name).strip().lower().replace("_", "-")
    key = {"d-trak": "dtrak", "grad-dot": "tracin", "graddot": "tracin", "ek-fac": "ekfac"}.get(key, key)
    if key not in METHODS:
        raise UserError(f"unknown method '{name}'; use one of: {', '.join(METHODS)}")
    return METHODS[key](**kwargs)


def configure(method: str | BaseMethod, *, kernel: str = DEFAULT_KERNEL, c: float | None = DEFAULT_C,
              **settings: Any) -> BaseMethod:
    """A base method with the stages' settings, so callers never test method names: a feature kernel with a λ takes
    `kernel` and `c` (None: its default), one without takes none; a method that needs the model takes `c` and its
    `settings` (groups, measurement, factors, …). A configured method object is returned as it is."""
    if isinstance(method, BaseMethod):
        return method
    bare = get_method(method)
    if bare.needs_model:
        return get_method(method, c=c, **settings)
    if not bare.uses_lambda:
        return bare
    return get_method(method, kernel=kernel, c=bare.default_c if c is None else c)
