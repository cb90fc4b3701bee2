"""`gradtrace eval counterfactual`: retrain without each query's top-k attributed training images.

For each of the first `num_queries` queries, three kinds of models are trained with the run's recipe and the
same seeds: on the full training set (shared by all queries), without the query's top-k training images
(by the method's scores), and without k training images drawn at random (seeded). The result per query is
how much worse the model does on it (its LDS output on the shared grid, averaged over seeds), s = +1 for an
output that is a loss (diffusion) and −1 for one that is not (a classifier's margin):

    Δ_top(q) = s·(f(q | D \\ top_k(q)) − f(q | D)),     Δ_random(q) = s·(f(q | D \\ random_k) − f(q | D))

Good attributions give Δ_top > Δ_random (removing what helped makes the model worse on the query). Models live in
``OUT/models/``, resumable like `gradtrace retrain`; results in ``OUT/counterfactual.json``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gradtrace.attribution import score_queries
from gradtrace.errors import UserError
from gradtrace.evaluate.harness import Job, is_finished, model_dir, train_jobs
from gradtrace.evaluate.outputs import OutputGrid, model_outputs, store_examples
from gradtrace.evaluate.recipe import load_recipe
from gradtrace.evaluate.retrain import open_or_create
from gradtrace.evaluate.saved_attributions import attribution_selection
from gradtrace.features.store import FeatureStore
from gradtrace.io import command_line, versions, write_json_atomic
from gradtrace.methods import DEFAULT_KERNEL
from gradtrace.metrics.stats import mean_ci

RESULT = "counterfactual.json"


def counterfactual_jobs(train_ids, query_ids, top_ids, random_ids, seeds) -> list[Job]:
    jobs = [Job(f"full-r{r}", np.asarray(train_ids), s, {"removed": "none", "replicate": r})
            for r, s in enumerate(seeds)]
    for q, top, rand in zip(query_ids, top_ids, random_ids):
        for kind, removed in (("top", top), ("random", rand)):
            keep = np.setdiff1d(train_ids, removed)
            jobs += [Job(f"q{int(q)}-{kind}-r{r}", keep, s, {"query_id": int(q), "removed": kind, "replicate": r})
                     for r, s in enumerate(seeds)]
    return jobs


def counterfactual_run(run, train_features, queries, out, *, method="trak", kernel: str = DEFAULT_KERNEL,
                       c=None, weights=None, weights_path=None, learning_queries=None, num_queries: int = 5,
                       k: int = 10,
                       n_seeds: int = 1, workers: int = 1, random_seed: int = 0, grid: OutputGrid = OutputGrid(),
                       max_models: int | None = None, attributions=None, progress: bool = True) -> dict:
    """Train the models that remain (resumable), then measure each query's Δ_top and Δ_random. `attributions`: a
    dense attribute output folder (EK-FAC) instead of the feature stores and scoring options."""
    for value, flag in ((num_queries, "--num-queries"), (k, "--top-k")):
        if int(value) != value or value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    recipe = load_recipe(run)
    if k >= len(recipe.train_ids):
        raise UserError(f"--top-k {k} must be smaller than the training set ({len(recipe.train_ids)} examples)")
    if attributions is not None:  # a dense attribute output (EK-FAC): its own top-k, sources and method
        chosen = attribution_selection(attributions, recipe, num_queries, k)
    else:
        chosen = _store_selection(recipe, train_features, queries, num_queries, k, method=method, kernel=kernel,
                                  c=c, weights=weights, weights_path=weights_path, learning_queries=learning_queries,
                                  progress=progress)
    top_ids, query_ids, nq = chosen["top_ids"], chosen["query_ids"], len(chosen["query_ids"])
    rng = np.random.default_rng(int(random_seed))
    random_ids = np.stack([np.sort(rng.choice(recipe.train_ids, size=int(k), replace=False)) for _ in range(nq)])
    seeds = recipe.replicate_seeds(n_seeds)
    jobs = counterfactual_jobs(recipe.train_ids, query_ids, top_ids, random_ids, seeds)
    # The folder's identity is what decides the models trained in it (the removed ids, seeds, recipe, queries);
    # the method and weights that chose the top-k are provenance: weights equal up to rounding, or another
    # method, that pick the same ids reuse the same models.
    settings = {"kind": "counterfactual", "recipe": recipe.summary(), "query_features": chosen["queries"],
                "query_ids": query_ids.tolist(), "k": int(k), "random_seed": int(random_seed),
                "top_ids": top_ids.tolist(), "random_ids": random_ids.tolist(), "seeds": seeds,
                "jobs": [j.name for j in jobs]}
    chosen_by = {"method": chosen["method"], "weights": chosen["weights"]}
    out = Path(out)
    open_or_create(out, settings, "counterfactual retraining",
                   "pass the same method, queries, --top-k, --seeds and --random-seed to resume, or a new --out",
                   {"run": recipe.run})
    stats = train_jobs(out, jobs, recipe, workers=workers, max_models=max_models, progress=progress)
    missing = [j.name for j in jobs if not is_finished(out, j)]
    if missing:
        return {"finished": False, "missing": missing, "stats": stats}
    adapter = recipe.adapter
    first = chosen["examples"]()
    losses, info = model_outputs(adapter, [(j.name, model_dir(out, j)) for j in jobs], first, out / "outputs", grid,
                                 progress=progress)
    doc = summarize_counterfactual(jobs, losses, query_ids, len(seeds), top_ids, random_ids, seed=random_seed,
                                   harm_sign=1.0 if adapter.output_is_loss else -1.0)
    doc["manifest"] = {"format": "gradtrace-counterfactual", "format_version": 1, "run": recipe.run,
                       "command": command_line(), **settings, **chosen_by, "lambda": chosen["lambda"],
                       "model_output": {"name": adapter.output_name, "grid": grid.info(), "cache": info["path"],
                                        "worse_when": "higher" if adapter.output_is_loss else "lower"},
                       "versions": versions()}
    doc["stats"] = {k: v for k, v in stats.items() if k != "model_wall_s"}
    doc["finished"] = True
    write_json_atomic(out / RESULT, doc)
    return doc


def _store_selection(recipe, train_features, queries, num_queries: int, k: int, *, method, kernel, c, weights,
                     weights_path, learning_queries, progress: bool) -> dict:
    """The first queries of a store, their top-k training ids by the method's scores, and what to record."""
    train = FeatureStore.open(train_features)
    query = FeatureStore.open(queries)
    if train.settings.get("model_fingerprint") != recipe.fingerprint or \
            not np.array_equal(np.sort(np.asarray(train.ids)), recipe.train_ids):
        raise UserError(f"training features {train.path} are not the run's training set featurized with its model; "
                        "featurize the run's training set with the run's checkpoint")
    scored = score_queries(train, query, method=method, kernel=kernel, c=c, weights=weights,
                           weights_path=weights_path, learning_queries=learning_queries, progress=progress)
    nq = min(int(num_queries), len(query.ids))
    top_rows, _ = scored.fitted.topk(scored.query_features[:nq], int(k), scored.weights)
    return {"top_ids": np.sort(np.asarray(train.ids)[top_rows], axis=1),
            "query_ids": np.asarray(query.ids[:nq], dtype=np.int64), "method": scored.fitted.info,
            "weights": scored.weights_info, "lambda": scored.lambda_info, "queries": str(Path(queries).resolve()),
            "examples": lambda: store_examples(recipe.adapter, recipe.model_config, query).take(np.arange(nq))}


def summarize_counterfactual(jobs: list[Job], outputs: np.ndarray, query_ids, n_seeds: int, top_ids, random_ids,
                             *, seed: int = 0, harm_sign: float = 1.0) -> dict:
    """Per-query Δ_top and Δ_random (mean over seeds; `harm_sign` −1 for an output that is not a loss) and their
    means over queries with bootstrap CIs."""
    index = {j.name: i for i, j in enumerate(jobs)}

    def mean_output(prefix: str, q: int) -> float:
        return float(np.mean([outputs[index[f"{prefix}-r{r}"], q] for r in range(n_seeds)]))

    rows = []
    for q, qid in enumerate(query_ids):
        base = mean_output("full", q)
        top, rand = mean_output(f"q{int(qid)}-top", q), mean_output(f"q{int(qid)}-random", q)
        rows.append({"query_id": int(qid), "output_full": base, "output_without_top": top,
                     "output_without_random": rand,
                     "delta_top": harm_sign * (top - base), "delta_random": harm_sign * (rand - base),
                     "removed_top": [int(i) for i in top_ids[q]], "removed_random": [int(i) for i in random_ids[q]]})
    d_top = np.array([r["delta_top"] for r in rows])
    d_rand = np.array([r["delta_random"] for r in rows])
    return {"summary": {"n_queries": len(rows), "delta_top": mean_ci(d_top, seed),
                        "delta_random": mean_ci(d_rand, seed), "delta_top_minus_random": mean_ci(d_top - d_rand, seed),
                        "fraction_top_above_random": float(np.mean(d_top > d_rand))},
            "per_query": rows}


def counterfactual_table(doc: dict) -> str:
    """A markdown table of the per-query outputs and changes (positive = worse on the query), with the mean row."""
    name = doc.get("manifest", {}).get("model_output", {}).get("name", "output")
    lines = [f"| query | {name} (full) | Δ without top-k | Δ without random k |", "|---|---|---|---|"]
    for r in doc["per_query"]:
        lines.append(f"| {r['query_id']} | {r['output_full']:.5f} | {r['delta_top']:+.5f} | {r['delta_random']:+.5f} |")
    s = doc["summary"]
    lines.append(f"| mean | | {s['delta_top']['mean']:+.5f} | {s['delta_random']['mean']:+.5f} |")
    return "\n".join(lines)
