"""Base attribution methods, one interface (`BaseMethod`): per-group contributions c_j(q, n) with
τ_w(q, n) = Σ_j w_j c_j(q, n), and the facts a stage needs as properties (`needs_model`, `uses_lambda`, ...).

Feature kernels (`Method`: TracIn, TRAK, D-TRAK, DAS) turn stored features into Ψ = Φ K:

    fitted = get_method("trak", kernel="per-group").fit(train_features, group_slices)
    scores = fitted.scores(query_features, weights=w)          # (Q, N) float32
    idx, top = fitted.topk(query_features, k=10, weights=w)    # streamed over Ψ

Methods that need the model (`ModelMethod`: EK-FAC) open a session on a checkpoint:

    session = get_method("ekfac").session(checkpoint, default_factors=path).fit()
    contrib = session.contributions(session.examples(None, ids), c)   # (Q, N, M)
"""
from gradtrace.methods.base import BaseMethod, FittedMethod, Method, lambda_grid
from gradtrace.methods.model_method import ModelMethod, ModelSession
from gradtrace.methods.registry import MethodNames, configure, get_method, known_methods, register_method
from gradtrace.methods.tracin import TracIn
from gradtrace.methods.trak import (
                                    DEFAULT_C,
                                    DEFAULT_KERNEL,
                                    KERNELS,
                                    TRAK,
                                    Gram,
                                    accumulate_gram,
                                    check_c,
                                    regularised_inverse,
)

__all__ = ["BaseMethod", "Method", "ModelMethod", "ModelSession", "FittedMethod", "TracIn", "TRAK", "Gram",
           "MethodNames", "configure", "get_method", "known_methods", "lambda_grid", "register_method",
           "accumulate_gram", "regularised_inverse", "check_c", "DEFAULT_C", "DEFAULT_KERNEL", "KERNELS"]
