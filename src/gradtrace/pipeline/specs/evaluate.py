"""The evaluation stages' specs: retrain, eval lds, eval counterfactual, eval mislabel, eval tail-patch."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import (
    DEFAULT_GUARD,
    DEFAULT_PROJECTION,
    DEFAULT_STEPS,
    GUARDS,
    MISLABEL_METHODS,
    N_BOOTSTRAP,
    PROJECTIONS,
    TOP_FRACTION,
    check_fraction,
    needs_model,
)
from gradtrace.errors import UserError
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, learning_queries_option, method_option
from gradtrace.pipeline.spec import Spec, non_negative, option, positive, positive_number

RETRAIN_EPILOG = ("Resumable: rerun the same command after an interruption. Several machines: torchrun --nnodes N "
                  "--nproc-per-node 1 ... -m gradtrace.cli -- retrain --run RUN --out SHARED_DIR (the -- stops "
                  "torchrun reading --run as its --run-path); rank r trains the models i with i % WORLD_SIZE == r.")


@dataclass
class RetrainSpec(Spec):
    run: str = option(None, "checkpoint directory of the full model", required=True)
    subsets: int = option(64, "number of subsets S", check=positive)
    fraction: float = option(0.5, "subset size as a fraction α of the training set")
    seeds: int = option(1, "training seeds R per subset", check=positive)
    workers: int = option(1, "single-threaded worker processes", check=positive)
    subset_seed: int = option(0, "seed of the subset draw (recorded)")
    max_models: int | None = option(None, "stop after training this many models", type=int, check=non_negative)
    out: str | None = option(None, "retraining directory (default: RUN/retrain)", type=str)


def attributions_option():
    return option(None, "instead of feature stores and scoring options: an `attribute --method ekfac` output folder "
                        "(its dense scores; methods that score the model directly)", type=str)


def check_method_inputs(spec) -> None:
    """A method that needs the model (`needs_model`) has no feature stores: its scores come from an attribute output
    (`--attributions`); refused in one line otherwise."""
    if getattr(spec, "attributions", None) is None and needs_model(spec.method):
        raise UserError(f"method '{spec.method}' scores the model directly: run `gradtrace attribute --method "
                        f"{spec.method} --checkpoint RUN --ids FILE --out DIR` and pass --attributions DIR")


def check_attributions_alone(spec) -> None:
    given = [flag for flag, value in (("--train-features", spec.train_features), ("--queries", spec.queries),
                                      ("--weights", spec.weights), ("--lambda-c", spec.lambda_c),
                                      ("--learning-queries", spec.learning_queries)) if value is not None]
    if spec.attributions is not None and given:
        raise UserError(f"--attributions carries its own scores (weights and λ included); drop {given[0]}")


@dataclass
class ScoringEvalSpec(Spec):
    """What `eval lds` and `eval counterfactual` share: the run, the stores, the scoring, the output grid."""

    run: str = option(None, "checkpoint directory of the full model", required=True)
    train_features: str | None = option(None, "feature store of the run's training set (required)", type=str)
    queries: str | None = option(None, "feature store of the evaluation queries (required)", type=str)
    out: str = option(None, "output directory", required=True)
    method: str = method_option()
    kernel: str = kernel_option()
    lambda_c: str | float | None = lambda_c_option()
    learning_queries: str | None = learning_queries_option()
    weights: str | None = option(None, "group weights file (default: uniform)", type=str)
    timesteps: int = option(10, "timesteps of the model-output grid", check=positive)
    draws: int = option(4, "noise draws per timestep of the model-output grid", check=positive)

    def validate(self) -> None:
        check_method_inputs(self)
        if getattr(self, "attributions", None) is None and (self.train_features is None or self.queries is None):
            raise UserError("--train-features and --queries are required")


@dataclass
class EvalLDSSpec(ScoringEvalSpec):
    retrain: str = option(None, "retraining directory (from `gradtrace retrain`)", required=True)
    per_group: bool = option(False, "also the LDS of each parameter group alone (+ plot)")
    seed: int = option(0, "bootstrap seed")
    attributions: str | None = attributions_option()

    def validate(self) -> None:
        super().validate()
        check_attributions_alone(self)


@dataclass
class CounterfactualSpec(ScoringEvalSpec):
    num_queries: int = option(5, "the first N queries of the store", check=positive)
    top_k: int = option(10, "training images removed per query", check=positive)
    seeds: int = option(1, "training seeds R per model", check=positive)
    workers: int = option(1, "single-threaded worker processes", check=positive)
    random_seed: int = option(0, "seed of the random removals")
    max_models: int | None = option(None, "stop after training this many models", type=int, check=non_negative)
    attributions: str | None = attributions_option()

    def validate(self) -> None:
        super().validate()
        check_attributions_alone(self)


@dataclass
class MislabelSpec(Spec):
    run: str = option(None, "checkpoint directory of a classifier run", required=True)
    out: str = option(None, "output directory (resumable)", required=True)
    fraction: float = option(0.1, "fraction of training labels flipped, in (0, 1)",
                             check=lambda v, flag: check_fraction(v, flag))
    flip_seed: int = option(0, "seed of the flips (and of the drawn learning ids)")
    methods: str = option(MISLABEL_METHODS, "methods to compare, comma-separated; METHOD:KERNEL for TRAK; ekfac: "
                          "EK-FAC (kronfluence on the corrupted model)")
    measurement: str | None = option(None, "what is differentiated (default: the model's own: margin; or loss)",
                                     type=str)
    groups: str = option("block", "tensor | module | an adapter preset (block) | 'name=regex,...'")
    projection: str = option(DEFAULT_PROJECTION, "projection of each group's gradient", choices=PROJECTIONS)
    dim: int | None = option(None, "total projection dimension (default 8192 for kronecker, 2048 otherwise)",
                             type=int, check=positive)
    proj_seed: int = option(0, "projection seed")
    learning_data: str | None = option(None, "labelled images for the learning queries (default: the run's "
                                       "dataset, images it was not trained on)", type=str)
    learning_ids: object = option(None, "file of learning-query ids (default: --num-learning drawn)", type=str)
    num_learning: int = option(100, "learning queries drawn when --learning-ids is not given", check=positive)
    lambda_c: str | float | None = lambda_c_option(default="auto")
    learn_steps: int = option(DEFAULT_STEPS, "optimiser steps of the weight learner", check=positive)
    guard: str = option(DEFAULT_GUARD, "the weight learner's guard (see learn-weights)", choices=GUARDS)
    top_fraction: float = option(TOP_FRACTION, "report the fraction of flipped examples in this top fraction",
                                 check=lambda v, flag: check_fraction(v, flag))
    bootstrap: int = option(N_BOOTSTRAP, "bootstrap replicates of the 95%% CIs", check=positive)
    seed: int = option(0, "bootstrap seed")


@dataclass
class TailPatchSpec(ScoringEvalSpec):
    top_k: int = option(10, "training examples in each query's step", check=positive)
    lr: float = option(1e-2, "learning rate of the one SGD step", check=positive_number)
    num_queries: int | None = option(None, "the first N queries of the store (default: all)", type=int,
                                     check=positive)
    random_seed: int = option(0, "seed of the random k examples")
    seed: int = option(0, "bootstrap seed")
    attributions: str | None = option(None, "instead of feature stores and scoring options: an `attribute "
                                            "--method ekfac` output folder (with --weights: learned and uniform "
                                            "rows; without: uniform)", type=str)

    def validate(self) -> None:
        super().validate()
        check_attributions_alone(self)
