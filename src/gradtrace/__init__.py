"""gradtrace: training data attribution with learned parameter-group weights.

The front door (names load on first use, so `import gradtrace` stays light):

    tracer = Tracer(model, train=dataset, store="runs/x")   # the model object and data you hold (examples/)
    result = tracer.attribute(queries, method="trak", top_k=10)
    from gradtrace import FeaturizeSpec, featurize_run, AttributeSpec, attribute_run, FeatureStore
    store = featurize_run(FeaturizeSpec(checkpoint="runs/digits", out="runs/feat-train"))
    scored = score_queries(store, FeatureStore.open("runs/feat-queries"), method="trak")
    result = AttributionResult.open("runs/attr")   # an attribute output: result.to_pandas(), inline HTML, PIL images
    result = learn_weights(scored.fitted, query_features)          # the label-free group weights
    fitted = get_method("dtrak", kernel="per-group").fit(features, group_slices)

Stages and their specs live in `gradtrace.pipeline`, kinds of model in `gradtrace.adapters`.
"""
from importlib import import_module

from gradtrace.errors import UserError  # noqa: F401  (in __all__)
from gradtrace.extras import missing_extra

__version__ = "0.2.0.dev0"

_EXPORTS = {
    "gradtrace.pipeline": ["AttributeSpec", "CounterfactualSpec", "DemoSpec", "EvalLDSSpec", "FeaturizeSpec",
                           "LearnWeightsSpec", "RetrainSpec", "SampleSpec", "TrainSpec", "attribute_run",
                           "eval_counterfactual", "eval_lds", "featurize_run", "learn_weights_run", "retrain",
                           "run_demo", "sample_run", "train_run"],
    "gradtrace.pipeline.result": ["AttributionResult"],
    "gradtrace.pipeline.tracer": ["Tracer"],
    "gradtrace.pipeline.weights_result": ["WeightsResult"],
    "gradtrace.features.store": ["FeatureStore"],
    "gradtrace.methods": ["get_method"],
    "gradtrace.weights": ["learn_weights"],
    "gradtrace.attribution": ["score_queries"],
    "gradtrace.adapters": ["ModelAdapter", "get_adapter"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted([*_WHERE, "UserError", "__version__"])


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")
    try:
        module = import_module(_WHERE[name])
    except ImportError as exc:  # an optional package it needs: one line naming the extra (`gradtrace.extras`)
        error = missing_extra(exc, f"gradtrace.{name}")
        if error is None:
            raise
        raise error from None
    return getattr(module, name)
