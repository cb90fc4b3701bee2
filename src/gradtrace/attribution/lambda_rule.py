"""The λ scale c of every method and stage: one rule for what a user may pass, and how each stage resolves it.

Valid values (`parse_c`): a finite number >= 0 (`gradtrace.methods.check_c`; 0 = no damping), or "auto" = the c of
the method's log grid 1e-4..1 (`method.lambda_grid()`) whose uniform-weight label-free SNR objective is best on
*learning* queries (never the queries scored), or None = the stage's default. Defaults: `attribute`, `eval lds` and
`eval counterfactual` use the c the weights file was learned with, else the method's `default_c` (TRAK 0.01, EK-FAC
0.1); `learn-weights` and `eval mislabel` use "auto". A method without λ (TracIn) ignores c; "auto" with it is refused.

The same rule for both kinds of method (`gradtrace.methods`): a feature kernel is refitted per c from one Gram pass
(`gradtrace.weights.choose_lambda_scale`); a method that needs the model scores the learning queries at each c of its
grid (`choose_model_c`).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from gradtrace.attribution.gram_cache import store_gram, wants_cache
from gradtrace.attribution.psi_place import psi_place
from gradtrace.attribution.shard_fit import job_gram, row_scale_of
from gradtrace.attribution.weights_file import query_set_id
from gradtrace.choices import AUTO, parse_c  # noqa: F401  (the CLI's choices)
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods import BaseMethod, configure
from gradtrace.weights import DEFAULT_K, choose_lambda_scale, snr_loss
from gradtrace.weights.row_source import Shard

PLATEAU_RTOL = 1e-3  # grid_edge: an edge whose loss is within this of its neighbour's is a plateau, not a cliff


def _method(method, kernel: str) -> BaseMethod:
    return configure(method, kernel=kernel)


# ---- feature kernels: choose on learning-query feature stores ------------------------------------------------

def choose_c(train: FeatureStore, learning: FeatureStore, method, kernel: str, k: int, *,
             shard: Shard | None = None, blocks=None) -> tuple[float, list]:
    """(c, [[c, loss], ...]): the SNR-best c of the grid on the learning queries, with uniform weights. `shard` (a
    torchrun rank, `gradtrace.attribution.shard_fit`): its rows only, with the job's Gram `blocks`."""
    base = _method(method, kernel)
    if shard is None:
        features, scale = train.features, (train.row_scale if base.needs_row_scale else None)
        gram = store_gram(train, base)[0] if wants_cache(train, base) else None  # kept beside a large store
    else:
        features, scale = shard.view, row_scale_of(train, base, shard.view)
        gram = job_gram(base, blocks, train, shard.view)
    with psi_place(train, base) as psi_path:
        best, table = choose_lambda_scale(features, train.group_slices, np.asarray(learning.features),
                                          method=base.name, kernel=getattr(base, "kernel", kernel), k=k,
                                          row_scale=scale, gram=gram, psi_path=psi_path, shard=shard)
    table = [[float(a), float(b)] for a, b in table]
    edge = grid_edge(float(best), table)
    if edge is not None:
        warnings.warn(GradtraceWarning(
            f"the label-free λ scale c = {best:.0e} is the {edge} value of the grid {table[0][0]:.0e}.."
            f"{table[-1][0]:.0e} searched on {learning.path}: the SNR objective may prefer a c beyond it; check the "
            "choice (the grid's losses are recorded) or pass --lambda-c NUMBER"), stacklevel=2)
    return float(best), table


def grid_edge(c: float, table: list) -> str | None:
    """"lowest" or "highest" when `c` is the first or last value of a grid of several c values and the objective
    still improves towards it: its loss differs from its neighbour's by more than `PLATEAU_RTOL` of its size. On a
    plateau (e.g. c -> 0, where a per-group kernel whose blocks are narrower than the training set stops changing)
    a c beyond the grid would score the same, so there is nothing to warn about; else None."""
    rows = sorted((float(a), float(b)) for a, b in table)
    if len(rows) < 2 or c not in (rows[0][0], rows[-1][0]):
        return None
    (edge_c, edge_loss), (_, next_loss) = (rows[0], rows[1]) if c == rows[0][0] else (rows[-1], rows[-2])
    if abs(edge_loss - next_loss) <= PLATEAU_RTOL * abs(edge_loss):
        return None
    return "lowest" if edge_c == rows[0][0] else "highest"


def resolve_learning_c(train: FeatureStore, learning: FeatureStore, method, kernel: str, c,
                       k: int, *, shard: Shard | None = None, blocks=None) -> tuple[float, list | None]:
    """`learn-weights`: (c, the grid table or None); c = "auto" chooses on the learning queries themselves (over a
    torchrun job's ranks with `shard` and the job's Gram `blocks`, see `choose_c`)."""
    value = parse_c(c)
    base = _method(method, kernel)
    if not base.uses_lambda:
        return 0.0, None
    if value == AUTO:
        return choose_c(train, learning, base, kernel, k, shard=shard, blocks=blocks)
    return (base.default_c if value is None else value), None


def resolve_scoring_c(train: FeatureStore, queries: FeatureStore, *, method, kernel: str, c,
                      weights_info: dict | None, learning_queries=None) -> tuple[float, dict]:
    """(c, its provenance) for the scoring stages: a number; "auto" = SNR-best on `learning_queries` (a store
    that is not `queries`: the choice never reads the queries scored); None = the weights' c, else the default."""
    value = parse_c(c)
    base = _method(method, kernel)
    if learning_queries is not None and value != AUTO:
        raise UserError("--learning-queries is only used with --lambda-c auto; drop it or pass --lambda-c auto")
    if value is None:
        return _default_c(base, weights_info)
    if value != AUTO:
        value = value if base.uses_lambda else 0.0
        return value, {"c": value, "rule": "given"}
    if not base.uses_lambda:
        raise UserError(f"--lambda-c auto needs a method with a λ (trak or dtrak); {base.name} has none")
    if learning_queries is None:
        raise UserError("--lambda-c auto chooses c on learning queries; pass --learning-queries STORE "
                        "(featurized generated samples or held-out images, not the --queries)")
    learn = FeatureStore.open(learning_queries)
    train.check_compatible(learn)
    if query_set_id(learn) == query_set_id(queries):
        raise UserError(f"--learning-queries {learn.path} holds the same queries as --queries; choose λ on "
                        f"other queries (learning and evaluation queries must be disjoint)")
    value, table = choose_c(train, learn, base, kernel, min(DEFAULT_K, len(train.ids)))
    return value, {"c": value, "rule": "auto: SNR-best on the learning queries", "grid": table,
                   "learning_queries": {"store": str(learn.path), **query_set_id(learn)}}


def _default_c(base: BaseMethod, weights_info: dict | None) -> tuple[float, dict]:
    from_weights = weights_info and weights_info.get("lambda_c") is not None
    value = weights_info["lambda_c"] if from_weights else base.default_c
    value = 0.01 if value is None else value  # a method without λ: the number is recorded, never used
    return float(value), {"c": float(value), "rule": "weights file" if from_weights else "default"}


# ---- methods that need the model: choose on learning-query examples -------------------------------------------

def choose_model_c(session, learning, k: int) -> tuple[float, list, np.ndarray]:
    """(c, [[c, loss], ...], the learning queries' (Q, N, M) contributions at c): the c of the method's grid whose
    uniform-weight SNR objective on the learning queries is lowest (ties: the smaller c)."""
    table, best = [], None  # best: (loss, c, contributions), only the best so far kept
    for c in session.method.lambda_grid():
        contrib = session.contributions(learning, float(c))
        m = contrib.shape[2]
        loss = float(snr_loss(torch.from_numpy(contrib), torch.full((m,), 1.0 / m, dtype=torch.float64), k))
        table.append([float(c), loss])
        if best is None or (loss, float(c)) < best[:2]:
            best = (loss, float(c), contrib)
    return best[1], table, best[2]


def resolve_model_learning_c(session, learning, c, k: int) -> tuple[float, list | None, np.ndarray]:
    """`learn-weights` and `eval mislabel` for a method that needs the model: (c, its grid table or None, the
    learning queries' (Q, N, M) contributions at c); c "auto" = `choose_model_c` with top-k `k`, None = the
    method's default."""
    value = parse_c(c)
    if value == AUTO:
        return choose_model_c(session, learning, k)
    value = session.method.default_c if value is None else value
    return value, None, session.contributions(learning, value)


def resolve_model_scoring_c(session, queries, c, weights_info: dict | None, learning=None) -> tuple[float, dict]:
    """`attribute` for a method that needs the model: (c, its provenance); "auto" = SNR-best on `learning` (examples
    that are not `queries`), None = the weights' c, else the method's default."""
    value = parse_c(c)
    if learning is not None and value != AUTO:
        raise UserError("--learning-ids is only used with --lambda-c auto; drop it or pass --lambda-c auto")
    if value == AUTO and learning is None:
        raise UserError("--lambda-c auto chooses c on learning queries; pass --learning-ids FILE (not the --ids)")
    if value == AUTO:
        if query_set_id(learning) == query_set_id(queries):
            raise UserError("--learning-ids are the --ids; choose λ on other queries")
        value, table, _ = choose_model_c(session, learning, min(DEFAULT_K, len(session.train.ids)))
        lam = {"c": value, "rule": "auto: SNR-best on the learning queries", "grid": table,
               "learning_queries": query_set_id(learning)}
    elif value is None:
        value, lam = _default_c(session.method, weights_info)
    else:
        lam = {"c": value, "rule": "given"}
    return value, {**lam, **session.lambda_facts(value)}


def check_model_scoring_c(c, learning_ids) -> None:
    """The checks of `resolve_model_scoring_c` that need no session: run before anything is loaded or written."""
    value = parse_c(c)
    if learning_ids is not None and value != AUTO:
        raise UserError("--learning-ids is only used with --lambda-c auto; drop it or pass --lambda-c auto")
    if value == AUTO and learning_ids is None:
        raise UserError("--lambda-c auto chooses c on learning queries; pass --learning-ids FILE (not the --ids)")
