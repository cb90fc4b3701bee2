"""The λ scale c of a scoring stage: one rule for what a user may pass, and how each stage resolves it.

Valid values (`parse_c`): a finite number >= 0 (`gradtrace.choices.check_c`; 0 = no damping), or "auto" = the
c of the log grid 1e-4..1 whose kernel gives the best label-free SNR objective with uniform weights on
*learning* queries (never the queries scored), or None = the stage's default. Defaults: `attribute`, `eval
lds` and `eval counterfactual` use the c the weights file was learned with, else `DEFAULT_C` (0.01);
`learn-weights` uses "auto". A method without λ (TracIn) ignores c; "auto" with it is refused.
"""
from __future__ import annotations

import warnings

import numpy as np

from gradtrace.attribution.weights_file import query_set_id
from gradtrace.choices import AUTO, parse_c  # noqa: F401  (the CLI's choices)
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods import DEFAULT_C, get_method
from gradtrace.weights import DEFAULT_K, choose_lambda_scale


def choose_c(train: FeatureStore, learning: FeatureStore, method: str, kernel: str, k: int) -> tuple[float, list]:
    """(c, [[c, loss], ...]): the SNR-best c of the grid on the learning queries, with uniform weights."""
    scale = train.row_scale if get_method(method).needs_row_scale else None
    best, table = choose_lambda_scale(train.features, train.group_slices, np.asarray(learning.features),
                                      method=method, kernel=kernel, k=k, row_scale=scale)
    table = [[float(a), float(b)] for a, b in table]
    edge = grid_edge(float(best), table)
    if edge is not None:
        warnings.warn(GradtraceWarning(
            f"the label-free λ scale c = {best:.0e} is the {edge} value of the grid {table[0][0]:.0e}.."
            f"{table[-1][0]:.0e} searched on {learning.path}: the SNR objective may prefer a c beyond it; check the "
            "choice (the grid's losses are recorded) or pass --lambda-c NUMBER"), stacklevel=2)
    return float(best), table


def grid_edge(c: float, table: list) -> str | None:
    """"lowest" or "highest" when `c` is the first or last value of a grid of several c values, else None."""
    values = [row[0] for row in table]
    if len(values) < 2:
        return None
    return "lowest" if c == min(values) else "highest" if c == max(values) else None


def resolve_learning_c(train: FeatureStore, learning: FeatureStore, method: str, kernel: str, c,
                       k: int) -> tuple[float, list | None]:
    """`learn-weights`: (c, the grid table or None); c = "auto" chooses on the learning queries themselves."""
    value = parse_c(c)
    if not get_method(method).uses_lambda:
        return 0.0, None
    if value == AUTO:
        return choose_c(train, learning, method, kernel, k)
    return (DEFAULT_C if value is None else value), None


def resolve_scoring_c(train: FeatureStore, queries: FeatureStore, *, method: str, kernel: str, c,
                      weights_info: dict | None, learning_queries=None) -> tuple[float, dict]:
    """(c, its provenance) for the scoring stages: a number; "auto" = SNR-best on `learning_queries` (a store
    that is not `queries`: the choice never reads the queries scored); None = the weights' c, else DEFAULT_C."""
    value = parse_c(c)
    if learning_queries is not None and value != AUTO:
        raise UserError("--learning-queries is only used with --lambda-c auto; drop it or pass --lambda-c auto")
    if value is None:
        from_weights = weights_info and weights_info.get("lambda_c") is not None
        value = weights_info["lambda_c"] if from_weights else DEFAULT_C
        return float(value), {"c": float(value), "rule": "weights file" if from_weights else "default"}
    uses_lambda = get_method(method).uses_lambda
    if value != AUTO:
        value = value if uses_lambda else 0.0
        return value, {"c": value, "rule": "given"}
    if not uses_lambda:
        raise UserError(f"--lambda-c auto needs a method with a λ (trak or dtrak); {method} has none")
    if learning_queries is None:
        raise UserError("--lambda-c auto chooses c on learning queries; pass --learning-queries STORE "
                        "(featurized generated samples or held-out images, not the --queries)")
    learn = FeatureStore.open(learning_queries)
    train.check_compatible(learn)
    if query_set_id(learn) == query_set_id(queries):
        raise UserError(f"--learning-queries {learn.path} holds the same queries as --queries; choose λ on "
                        f"other queries (learning and evaluation queries must be disjoint)")
    value, table = choose_c(train, learn, method, kernel, min(DEFAULT_K, len(train.ids)))
    return value, {"c": value, "rule": "auto: SNR-best on the learning queries", "grid": table,
                   "learning_queries": {"store": str(learn.path), **query_set_id(learn)}}
