"""Base attribution methods: kernels that turn per-group gradient features into scores.

    τ_w(q, n) = Σ_j w_j φ_j(q) · ψ_j(x_n),   Ψ = Φ K

    fitted = get_method("trak", kernel="per-group").fit(train_features, group_slices)
    scores = fitted.scores(query_features, weights=w)          # (Q, N) float32
    idx, top = fitted.topk(query_features, k=10, weights=w)    # streamed over Ψ
"""
from gradtrace.methods.base import FittedMethod, Method
from gradtrace.methods.registry import configure, get_method, known_methods, lambda_grid
from gradtrace.methods.tracin import TracIn
from gradtrace.methods.trak import (DEFAULT_C, DEFAULT_KERNEL, KERNELS, TRAK, Gram, accumulate_gram, check_c,
                                    regularised_inverse)

__all__ = ["Method", "FittedMethod", "TracIn", "TRAK", "Gram", "configure", "get_method", "known_methods",
           "lambda_grid", "accumulate_gram", "regularised_inverse", "check_c", "DEFAULT_C", "DEFAULT_KERNEL", "KERNELS"]
