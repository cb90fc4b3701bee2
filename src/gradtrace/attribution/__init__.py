"""The one scoring recipe: fit a base method on a training store, apply group weights and λ, keep the top-k
with per-group contributions, and write the attributions artefact.

    scored = score_queries(train, queries, method="trak")     # gradtrace.attribution.scoring
    write_attributions(scored, train, queries, "out", top_k=10)
"""
from gradtrace.attribution.lambda_rule import (
                                               AUTO,
                                               check_model_scoring_c,
                                               choose_model_c,
                                               parse_c,
                                               resolve_learning_c,
                                               resolve_model_learning_c,
                                               resolve_model_scoring_c,
                                               resolve_scoring_c,
)
from gradtrace.attribution.output import query_side_for, write_attributions, write_contribution_attributions
from gradtrace.attribution.scoring import Scored, at_c, fit_method, score_queries
from gradtrace.attribution.weights_file import (
                                               default_weights_path,
                                               query_set_id,
                                               read_group_weights,
                                               read_model_weights,
                                               store_identity,
)

__all__ = ["AUTO", "Scored", "at_c", "check_model_scoring_c", "choose_model_c", "default_weights_path", "fit_method",
           "parse_c", "query_set_id", "query_side_for", "read_group_weights", "read_model_weights",
           "resolve_learning_c", "resolve_model_learning_c", "resolve_model_scoring_c", "resolve_scoring_c",
           "score_queries", "store_identity", "write_attributions", "write_contribution_attributions"]
