"""The pipeline: one module per stage, each a spec dataclass and one function (spec in, artefact + manifest out).

    train_run(TrainSpec(data="digits", out="runs/digits"))
    sample_run(SampleSpec(checkpoint="runs/digits", out="runs/queries"))
    featurize_run(FeaturizeSpec(checkpoint="runs/digits", out="runs/feat-train"))
    attribute_run(AttributeSpec(train="runs/feat-train", queries="runs/feat-queries", out="runs/attr"))
    learn_weights_run(LearnWeightsSpec(train="runs/feat-train", generate=64))
    retrain(RetrainSpec(run="runs/digits")); eval_lds(EvalLDSSpec(...)); eval_counterfactual(CounterfactualSpec(...))
    run_demo(DemoSpec(out="demo_out", quick=True))
"""
from gradtrace.pipeline.attribute import AttributeSpec, attribute_run
from gradtrace.pipeline.build_pipeline import BuildPipelineSpec, build_pipeline_run
from gradtrace.pipeline.demo import DemoSpec, run_demo
from gradtrace.pipeline.evaluate import (
                                         CounterfactualSpec,
                                         EvalLDSSpec,
                                         RetrainSpec,
                                         eval_counterfactual,
                                         eval_lds,
                                         retrain,
)
from gradtrace.pipeline.featurize import FeaturizeSpec, featurize_run
from gradtrace.pipeline.learn_weights import LearnWeightsSpec, learn_weights_run
from gradtrace.pipeline.sample import SampleSpec, sample_run
from gradtrace.pipeline.train import TrainSpec, train_run

__all__ = ["AttributeSpec", "CounterfactualSpec", "DemoSpec", "EvalLDSSpec", "FeaturizeSpec", "LearnWeightsSpec",
           "RetrainSpec", "SampleSpec", "TrainSpec", "attribute_run", "eval_counterfactual", "eval_lds",
           "featurize_run", "learn_weights_run", "retrain", "run_demo", "sample_run", "train_run"]
__all__ += ["BuildPipelineSpec", "build_pipeline_run"]
