"""The evaluation stages: `retrain` (subset models for the LDS), `eval lds`, `eval counterfactual`, `eval mislabel`,
`eval tail-patch`."""
from __future__ import annotations

from gradtrace.evaluate.counterfactual import counterfactual_run
from gradtrace.evaluate.eval_lds import eval_lds_run
from gradtrace.evaluate.mislabel import mislabel_run
from gradtrace.evaluate.outputs import OutputGrid
from gradtrace.evaluate.retrain import retrain_run
from gradtrace.evaluate.saved_attributions import lds_of_attributions
from gradtrace.evaluate.tail_patch import tail_patch_run
from gradtrace.features.featurize import FeatureSpec
from gradtrace.methods import configure
from gradtrace.pipeline.specs.evaluate import (  # noqa: F401
    RETRAIN_EPILOG,
    CounterfactualSpec,
    EvalLDSSpec,
    MislabelSpec,
    RetrainSpec,
    ScoringEvalSpec,
    TailPatchSpec,
)
from gradtrace.pipeline.train import resolve_ids


def output_grid(spec: ScoringEvalSpec) -> OutputGrid:
    """The model-output grid of an evaluation spec (timesteps × noise draws)."""
    return OutputGrid(num_timesteps=spec.timesteps, num_draws=spec.draws)


def retrain(spec: RetrainSpec, *, progress: bool = True) -> dict:
    return retrain_run(spec.run, spec.out, n_subsets=spec.subsets, fraction=spec.fraction, n_seeds=spec.seeds,
                       workers=spec.workers, subset_seed=spec.subset_seed, max_models=spec.max_models,
                       progress=progress)


def eval_lds(spec: EvalLDSSpec, *, progress: bool = True) -> dict:
    if spec.attributions is not None:
        return lds_of_attributions(spec.run, spec.retrain, spec.attributions, spec.out, per_group=spec.per_group,
                                   grid=output_grid(spec), seed=spec.seed, progress=progress)
    method = configure(spec.method, kernel=spec.kernel)  # the configured method object
    return eval_lds_run(spec.run, spec.retrain, spec.train_features, spec.queries, spec.out, method=method,
                        kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights, per_group=spec.per_group,
                        learning_queries=spec.learning_queries, grid=output_grid(spec), seed=spec.seed,
                        progress=progress)


def eval_counterfactual(spec: CounterfactualSpec, *, progress: bool = True) -> dict:
    method = configure(spec.method, kernel=spec.kernel)  # the configured method object
    return counterfactual_run(spec.run, spec.train_features, spec.queries, spec.out, method=method,
                              kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights,
                              learning_queries=spec.learning_queries, num_queries=spec.num_queries, k=spec.top_k,
                              n_seeds=spec.seeds, workers=spec.workers, random_seed=spec.random_seed,
                              grid=output_grid(spec), max_models=spec.max_models, attributions=spec.attributions,
                              progress=progress)


def eval_mislabel(spec: MislabelSpec, *, progress: bool = True) -> dict:
    features = FeatureSpec(groups=spec.groups, projection=spec.projection, total_dim=spec.dim,
                           projection_seed=spec.proj_seed, measurement=spec.measurement)  # None: the model's own
    return mislabel_run(spec.run, spec.out, fraction=spec.fraction, flip_seed=spec.flip_seed, methods=spec.methods,
                        feature_spec=features, learning_data=spec.learning_data,
                        learning_ids=resolve_ids(spec.learning_ids), num_learning=spec.num_learning,
                        lambda_c=spec.lambda_c, learn_steps=spec.learn_steps, guard=spec.guard,
                        top_fraction=spec.top_fraction, n_bootstrap=spec.bootstrap, seed=spec.seed,
                        progress=progress)


def eval_tail_patch(spec: TailPatchSpec, *, progress: bool = True) -> dict:
    method = configure(spec.method, kernel=spec.kernel)  # the configured method object
    return tail_patch_run(spec.run, spec.train_features, spec.queries, spec.out, method=method,
                          kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights,
                          learning_queries=spec.learning_queries, attributions=spec.attributions, k=spec.top_k,
                          lr=spec.lr,
                          num_queries=spec.num_queries, random_seed=spec.random_seed, grid=output_grid(spec),
                          seed=spec.seed, progress=progress)
