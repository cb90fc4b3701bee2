"""The evaluation stages: `retrain` (subset models for the LDS), `eval lds`, `eval counterfactual`, `eval tail-patch`."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.errors import UserError
from gradtrace.evaluate.counterfactual import counterfactual_run
from gradtrace.evaluate.eval_lds import eval_lds_run
from gradtrace.evaluate.outputs import OutputGrid
from gradtrace.evaluate.retrain import retrain_run
from gradtrace.evaluate.tail_patch import tail_patch_run
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, learning_queries_option, method_option
from gradtrace.pipeline.spec import Spec, non_negative, option, positive

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


def retrain(spec: RetrainSpec, *, progress: bool = True) -> dict:
    return retrain_run(spec.run, spec.out, n_subsets=spec.subsets, fraction=spec.fraction, n_seeds=spec.seeds,
                       workers=spec.workers, subset_seed=spec.subset_seed, max_models=spec.max_models,
                       progress=progress)


@dataclass
class ScoringEvalSpec(Spec):
    """What `eval lds` and `eval counterfactual` share: the run, the stores, the scoring, the output grid."""

    run: str = option(None, "checkpoint directory of the full model", required=True)
    train_features: str = option(None, "feature store of the run's training set", required=True)
    queries: str = option(None, "feature store of the evaluation queries", required=True)
    out: str = option(None, "output directory", required=True)
    method: str = method_option()
    kernel: str = kernel_option()
    lambda_c: str | float | None = lambda_c_option()
    learning_queries: str | None = learning_queries_option()
    weights: str | None = option(None, "group weights file (default: uniform)", type=str)
    timesteps: int = option(10, "timesteps of the model-output grid", check=positive)
    draws: int = option(4, "noise draws per timestep of the model-output grid", check=positive)

    def grid(self) -> OutputGrid:
        return OutputGrid(num_timesteps=self.timesteps, num_draws=self.draws)


@dataclass
class EvalLDSSpec(ScoringEvalSpec):
    retrain: str = option(None, "retraining directory (from `gradtrace retrain`)", required=True)
    per_group: bool = option(False, "also the LDS of each parameter group alone (+ plot)")
    seed: int = option(0, "bootstrap seed")


def eval_lds(spec: EvalLDSSpec, *, progress: bool = True) -> dict:
    return eval_lds_run(spec.run, spec.retrain, spec.train_features, spec.queries, spec.out, method=spec.method,
                        kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights, per_group=spec.per_group,
                        learning_queries=spec.learning_queries, grid=spec.grid(), seed=spec.seed, progress=progress)


@dataclass
class CounterfactualSpec(ScoringEvalSpec):
    num_queries: int = option(5, "the first N queries of the store", check=positive)
    top_k: int = option(10, "training images removed per query", check=positive)
    seeds: int = option(1, "training seeds R per model", check=positive)
    workers: int = option(1, "single-threaded worker processes", check=positive)
    random_seed: int = option(0, "seed of the random removals")
    max_models: int | None = option(None, "stop after training this many models", type=int, check=non_negative)


def eval_counterfactual(spec: CounterfactualSpec, *, progress: bool = True) -> dict:
    return counterfactual_run(spec.run, spec.train_features, spec.queries, spec.out, method=spec.method,
                              kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights,
                              learning_queries=spec.learning_queries, num_queries=spec.num_queries, k=spec.top_k,
                              n_seeds=spec.seeds, workers=spec.workers, random_seed=spec.random_seed,
                              grid=spec.grid(), max_models=spec.max_models, progress=progress)


def _positive_number(value, flag: str) -> None:
    if value is None or isinstance(value, bool) or not value > 0:
        raise UserError(f"{flag} must be a positive number, got {value}")


@dataclass
class TailPatchSpec(ScoringEvalSpec):
    top_k: int = option(10, "training examples in each query's step", check=positive)
    lr: float = option(1e-2, "learning rate of the one SGD step", check=_positive_number)
    num_queries: int | None = option(None, "the first N queries of the store (default: all)", type=int,
                                     check=positive)
    random_seed: int = option(0, "seed of the random k examples")
    seed: int = option(0, "bootstrap seed")


def eval_tail_patch(spec: TailPatchSpec, *, progress: bool = True) -> dict:
    return tail_patch_run(spec.run, spec.train_features, spec.queries, spec.out, method=spec.method,
                          kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights,
                          learning_queries=spec.learning_queries, k=spec.top_k, lr=spec.lr,
                          num_queries=spec.num_queries, random_seed=spec.random_seed, grid=spec.grid(),
                          seed=spec.seed, progress=progress)
