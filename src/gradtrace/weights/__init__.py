"""Learned parameter-group weights, without labels (the method: README, "Learned group weights and aspects").

    result = learn_weights(fitted, learning_query_features)      # WeightsResult: weights sum to 1
    fitted.scores(eval_query_features, weights=result.weights)
    save_weights("weights.json", result, provenance={...}); w, doc = load_weights("weights.json", names)
    best_c, table = choose_lambda_scale(train_features, group_slices, learning_query_features)

Defaults (k = 10, steps = 200, lr = 0.05, l2 = 0, pool_size = 256, refresh = "lazy", memory budget
64 MiB) come from the sweep in docs/benchmarks.md ("Weight learning at scale").
"""
from gradtrace.weights.artefact import load_weights, save_weights
from gradtrace.weights.defaults import (
                                        DEFAULT_GUARD,
                                        DEFAULT_K,
                                        DEFAULT_L2,
                                        DEFAULT_LR,
                                        DEFAULT_MEMORY_BUDGET,
                                        DEFAULT_POOL,
                                        DEFAULT_REFRESH,
                                        DEFAULT_STEPS,
)
from gradtrace.weights.diagnostics import cosine, solo_quality
from gradtrace.weights.guard import GUARDS
from gradtrace.weights.lambda_scale import choose_lambda_scale
from gradtrace.weights.learn import WeightsResult, dense_contributions, learn_weights, learn_weights_dense
from gradtrace.weights.objective import snr_loss

__all__ = ["snr_loss", "learn_weights", "learn_weights_dense", "WeightsResult", "dense_contributions",
           "choose_lambda_scale", "save_weights", "load_weights", "solo_quality", "cosine",
           "DEFAULT_K", "DEFAULT_STEPS", "DEFAULT_LR", "DEFAULT_L2", "DEFAULT_POOL",
           "DEFAULT_REFRESH", "DEFAULT_MEMORY_BUDGET", "DEFAULT_GUARD", "GUARDS"]
