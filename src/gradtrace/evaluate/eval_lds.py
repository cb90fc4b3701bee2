"""`gradtrace eval lds`: the LDS of an attribution method against a finished retraining.

Loads the run, the retraining (refusing one made from another run or unfinished), the training and query
feature stores (the training store must be the run's training set, featurized from the run's model),
computes the ground-truth outputs (cached in the retraining directory), scores the queries and writes
``lds.json`` (result + manifest) and, with per_group, ``lds_per_group.png``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradtrace.attribution import Scored, score_queries
from gradtrace.errors import UserError
from gradtrace.evaluate.outputs import OutputGrid, model_outputs, store_examples
from gradtrace.evaluate.recipe import Recipe, load_recipe
from gradtrace.evaluate.retrain import Retraining, open_retraining
from gradtrace.features.store import FeatureStore
from gradtrace.io import check_can_write, command_line, sha256_arrays, versions, write_json_atomic
from gradtrace.methods import DEFAULT_KERNEL
from gradtrace.metrics.lds import N_BOOTSTRAP, lds, lds_per_query, subset_mask, subset_predictions, summarize
from gradtrace.report.lds import plot_per_group

RESULT = "lds.json"
PLOT = "lds_per_group.png"


@dataclass
class LDSProblem:
    """Everything but the scores: the subset mask over training-store rows and the targets per query."""

    retraining: Retraining
    mask: np.ndarray        # (S, N) bool over the training store's rows
    outputs: np.ndarray     # (S·R, Q) model losses, job order
    targets: np.ndarray     # (S, Q) −loss averaged over seeds
    query_ids: np.ndarray
    outputs_info: dict
    recipe: Recipe

    def evaluate(self, scores: np.ndarray, *, seed: int = 0, n_bootstrap: int = N_BOOTSTRAP) -> dict:
        return lds(scores, self.mask, self.targets, query_ids=self.query_ids, seed=seed, n_bootstrap=n_bootstrap)


def targets_from_outputs(outputs: np.ndarray, n_subsets: int, n_seeds: int, negate: bool = True) -> np.ndarray:
    """(S, Q) = mean over seeds of the (S·R, Q) outputs (job i = s·R + r), negated for a loss."""
    mean = np.asarray(outputs, dtype=np.float64).reshape(n_subsets, n_seeds, -1).mean(1)
    return -mean if negate else mean


def load_problem(run, retrain, train_store, query_store, *, grid: OutputGrid = OutputGrid(),
                 progress: bool = True) -> LDSProblem:
    recipe, retraining = finished_retraining(run, retrain)
    check_training_store(train_store, recipe)
    train_store.check_compatible(query_store)
    mask = subset_mask(retraining.subsets, train_store.ids)
    adapter = recipe.adapter
    examples = store_examples(adapter, recipe.model_config, query_store)
    outputs, info = model_outputs(adapter, list(zip(retraining.jobs, retraining.model_paths())), examples,
                                  retraining.path / "outputs", grid, progress=progress)
    targets = targets_from_outputs(outputs, retraining.n_subsets, retraining.n_seeds, negate=adapter.output_is_loss)
    return LDSProblem(retraining=retraining, mask=mask, outputs=outputs, targets=targets, query_ids=examples.ids,
                      outputs_info=info, recipe=recipe)


def check_training_store(train_store, recipe: Recipe) -> None:
    """Refuse training features that are not the run's training set featurized with the run's model."""
    if train_store.settings.get("model_fingerprint") != recipe.fingerprint:
        raise UserError(f"training features {train_store.path} were not made from the run's model {recipe.run}; "
                        "featurize the training set with that checkpoint")
    if not np.array_equal(np.sort(np.asarray(train_store.ids)), recipe.train_ids):
        raise UserError(f"training features {train_store.path} cover {len(train_store.ids)} examples, not the run's "
                        f"{len(recipe.train_ids)} training ids; featurize the run's training set")


def finished_retraining(run, retrain):
    """The run's recipe and its retraining, refusing one from another run or one not finished."""
    recipe = load_recipe(run)
    retraining = open_retraining(retrain)
    retraining.check_run(recipe)
    retraining.check_complete()
    return recipe, retraining


def per_group_lds(problem: LDSProblem, scored: Scored, *, seed: int = 0) -> dict:
    """LDS with each group's contribution alone (one-hot group weights), summary per group name."""
    out = {}
    names = scored.fitted.group_names
    for j, name in enumerate(names):
        onehot = np.zeros(len(names))
        onehot[j] = 1.0
        per_q = lds_per_query(subset_predictions(scored.scores(onehot), problem.mask), problem.targets)
        out[name] = summarize(per_q, query_ids=problem.query_ids, seed=seed)
    return out


def eval_lds_run(run, retrain, train_features, queries, out, *, method="trak", kernel: str = DEFAULT_KERNEL,
                 c=None, weights_path=None, per_group: bool = False, grid: OutputGrid = OutputGrid(),
                 seed: int = 0, learning_queries=None, progress: bool = True) -> dict:
    """LDS (mean, 95% CI, per query) of one method; writes lds.json (+ with `per_group`, each group's LDS
    alone and its picture)."""
    start = time.perf_counter()
    recipe, _ = finished_retraining(run, retrain)  # the cheap checks first
    check_can_write(out)
    train = FeatureStore.open(train_features)
    query = FeatureStore.open(queries)
    check_training_store(train, recipe)
    # scoring refuses bad weights, λ and mismatched stores before any model output is computed and cached
    scored = score_queries(train, query, method=method, kernel=kernel, c=c, weights_path=weights_path,
                           learning_queries=learning_queries, progress=progress)
    problem = load_problem(run, retrain, train, query, grid=grid, progress=progress)
    result = problem.evaluate(scored.scores(), seed=seed)
    doc = {"manifest": eval_manifest(problem, train, query, scored, grid, seed), "lds": result}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if per_group:
        doc["per_group"] = per_group_lds(problem, scored, seed=seed)
        info = scored.fitted.info
        plot_per_group(doc["per_group"], result, out / PLOT,
                       f"LDS per parameter group alone ({info.get('method')}, {info.get('kernel', 'identity')} kernel)")
        doc["per_group_plot"] = str(out / PLOT)
    doc["wall_s"] = round(time.perf_counter() - start, 3)
    write_json_atomic(out / RESULT, doc)
    return doc


def eval_manifest(problem: LDSProblem, train, query, scored, grid: OutputGrid, seed: int) -> dict:
    r = problem.retraining
    return {"format": "gradtrace-lds", "format_version": 1, "command": command_line(),
            "run": r.manifest.get("run"), "run_fingerprint": r.settings["recipe"]["run_fingerprint"],
            "retrain": str(r.path.resolve()), "subsets": r.settings["subsets"], "seeds": r.seeds,
            "train_features": str(train.path.resolve()), "query_features": str(query.path.resolve()),
            "query_source": query.settings["source"], "query_ids_sha256": sha256_arrays([problem.query_ids]),
            "method": scored.fitted.info, "groups": scored.fitted.group_names,
            "measurement": train.settings["measurement"], "projection": train.settings["projection"],
            "weights": scored.weights_info, "lambda": scored.lambda_info,
            "model_output": {"name": problem.recipe.adapter.output_name, "grid": grid.info(),
                             "target": ("negative loss" if problem.recipe.adapter.output_is_loss else "output")
                                       + ", mean over seeds",
                             "cache": problem.outputs_info.get("path")},
            "bootstrap_seed": seed, "versions": versions()}
