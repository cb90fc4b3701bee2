"""The pipeline: one module per stage, each a spec dataclass and one function (spec in, artefact + manifest out).

    train_run(TrainSpec(data="digits", out="runs/digits"))
    sample_run(SampleSpec(checkpoint="runs/digits", out="runs/queries"))
    featurize_run(FeaturizeSpec(checkpoint="runs/digits", out="runs/feat-train"))
    attribute_run(AttributeSpec(train="runs/feat-train", queries="runs/feat-queries", out="runs/attr"))
    learn_weights_run(LearnWeightsSpec(train="runs/feat-train", generate=64))
    retrain(RetrainSpec(run="runs/digits")); eval_lds(EvalLDSSpec(...)); eval_counterfactual(CounterfactualSpec(...))
    run_demo(DemoSpec(out="demo_out", quick=True))

The specs live in `gradtrace.pipeline.specs` (they import no torch: the CLI builds its options from them at
start-up); each stage module re-exports its spec. Names here are imported on first use.
"""
from importlib import import_module

_EXPORTS = {
    "attribute": ["AttributeSpec", "attribute_run"],
    "demo": ["DemoSpec", "run_demo"],
    "evaluate": ["CounterfactualSpec", "EvalLDSSpec", "RetrainSpec", "eval_counterfactual", "eval_lds", "retrain"],
    "featurize": ["FeaturizeSpec", "featurize_run"],
    "learn_weights": ["LearnWeightsSpec", "learn_weights_run"],
    "sample": ["SampleSpec", "sample_run"],
    "train": ["TrainSpec", "train_run"],
    "build_pipeline": ["BuildPipelineSpec", "build_pipeline_run"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gradtrace.pipeline' has no attribute {name!r}")
    return getattr(import_module(f"gradtrace.pipeline.{_WHERE[name]}"), name)
