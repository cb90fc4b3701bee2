"""`gradtrace eval tail-patch`: how much one small gradient step on a query's top-k attributed training examples
helps the model on that query, against k random training examples.

For each query q and each set of k training examples (the top-k by the method's scores under uniform group
weights, under the learned weights when a weights file is given, and k drawn at random from a seeded generator),
starting each time from the run's own weights:

    θ' = θ − lr · ∇_θ (1/k) Σ_{n ∈ set} ℓ(x_n; θ)          (one plain SGD step on the adapter's training loss)
    Δ(q) = s · (f(q; θ) − f(q; θ'))                          (s = +1 for a loss output, −1 otherwise)

with f the adapter's model output (the LDS output; for a causal LM the query's mean token loss, so Δ is the
increase of its mean per-token log-likelihood). Good attributions give Δ_top > Δ_random. The result has each
query's Δ per set and the means over queries with bootstrap 95% CIs of the means and of the paired differences
(top − random; learned − uniform). Both top-k sets use the same λ scale: `c` when given, else the weights file's
(the uniform row would otherwise take the default rule and differ from the learned row in λ as well).

Methods that score the model directly (EK-FAC) give their top-k sets by `--attributions DIR`, a dense attribute
output: made with --weights, its scores are the learned row and the sum of its unweighted per-group contributions
the uniform row (the same λ); made without, its scores are the uniform row.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace.adapters import adapter_of
from gradtrace.attribution import score_queries
from gradtrace.errors import UserError
from gradtrace.evaluate.outputs import OutputGrid, store_examples
from gradtrace.evaluate.recipe import load_recipe
from gradtrace.evaluate.saved_attributions import check_for_run, examples_in_order, read_attributions
from gradtrace.features.store import FeatureStore
from gradtrace.io import check_can_write, command_line, versions, write_json_atomic
from gradtrace.methods import DEFAULT_KERNEL
from gradtrace.metrics.stats import mean_ci

RESULT = "tail_patch.json"
STEP_MEASUREMENT = "loss"  # every adapter's training loss


def sgd_step(model: torch.nn.Module, objective, examples, lr: float) -> None:
    """θ ← θ − lr · ∇ mean loss of `examples` (trainable parameters only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        total = objective.batch_total(model, examples.images, examples.ids, examples.cond)
        grads = torch.autograd.grad(total / len(examples.ids), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g)


def patched_outputs(adapter, checkpoint, objective, train_ex, query_ex, sets: np.ndarray, lr: float, grid,
                    *, progress: bool = True) -> np.ndarray:
    """(Q,) output of query q after one step on the training rows sets[q], from the checkpoint's weights each time."""
    model = checkpoint.model
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = np.empty(len(sets), dtype=np.float64)
    try:
        for q, rows in enumerate(tqdm(sets, desc="tail-patch", unit="query", disable=not progress, leave=False)):
            sgd_step(model, objective, train_ex.take(rows), lr)
            out[q] = adapter.outputs(checkpoint, query_ex.take([q]), grid)[0]
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in saved:
                        p.copy_(saved[n])
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    return out


def _store_sets(adapter, ckpt, train_features, queries, *, method, kernel, c, weights_path, learning_queries, k,
                num_queries, progress) -> dict:
    """Top-k rows per query from feature stores, scored by `method` (uniform; learned with `weights_path`)."""
    if train_features is None or queries is None:
        raise UserError("--train-features and --queries are required (or --attributions)")
    train = FeatureStore.open(train_features)
    query = FeatureStore.open(queries)
    if train.settings.get("model_fingerprint") != ckpt.fingerprint:
        raise UserError(f"training features {train.path} were not made from the model in the run; featurize its "
                        "training set with that checkpoint")
    if k >= len(train.ids):
        raise UserError(f"--top-k {k} must be smaller than the training set ({len(train.ids)} examples)")
    nq = len(query.ids) if num_queries is None else min(int(num_queries), len(query.ids))
    kinds = {}
    if weights_path is not None:  # first: the uniform row then uses the same λ scale (given, or the weights' c)
        kinds["learned"] = score_queries(train, query, method=method, kernel=kernel, c=c, weights_path=weights_path,
                                         learning_queries=learning_queries, progress=progress)
        c = kinds["learned"].lambda_info["c"] if kinds["learned"].lambda_info else c
    kinds = {"uniform": score_queries(train, query, method=method, kernel=kernel, c=c,
                                      learning_queries=learning_queries, progress=progress), **kinds}
    sets = {name: s.fitted.topk(s.query_features[:nq], int(k), s.weights)[0] for name, s in kinds.items()}
    chosen = kinds.get("learned", kinds["uniform"])
    return {"sets": sets, "train_ids": np.asarray(train.ids),
            "train_ex": store_examples(adapter, ckpt.model_config, train),
            "query_ex": store_examples(adapter, ckpt.model_config, query).take(np.arange(nq)),
            "record": {"train_features": str(train.path.resolve()), "query_features": str(query.path.resolve()),
                       "method": kinds["uniform"].fitted.info, "weights": chosen.weights_info,
                       "lambda": chosen.lambda_info}}


def _attribution_sets(run, folder, *, k, num_queries) -> dict:
    """Top-k rows per query from a dense attribute output (`attribute --method ekfac`): its scores are the learned row
    when it was weighted (then the uniform row is the sum of its unweighted contributions, at the same λ), else
    uniform."""
    attr = read_attributions(folder)
    recipe = load_recipe(run)
    check_for_run(attr, recipe)
    m = attr.manifest
    if k >= len(attr.train_ids):
        raise UserError(f"--top-k {k} must be smaller than the training set ({len(attr.train_ids)} examples)")
    nq = len(attr.query_ids) if num_queries is None else min(int(num_queries), len(attr.query_ids))
    scores = {"uniform": attr.scores[:nq]}
    if m.get("weights"):
        if attr.contributions is None:
            raise UserError(f"{attr.path} is weighted but has no contributions.npy (too large to keep), so its "
                            "uniform ranking is unknown; attribute without --weights for the uniform row")
        scores = {"uniform": attr.contributions[:nq].astype(np.float64).sum(-1), "learned": attr.scores[:nq]}
    sets = {name: np.argsort(-v, axis=1, kind="stable")[:, :int(k)] for name, v in scores.items()}
    train_ex = examples_in_order(recipe, recipe.source, attr.train_ids)
    query_ex = examples_in_order(recipe, m["query_source"], attr.query_ids[:nq])
    return {"sets": sets, "train_ids": attr.train_ids, "train_ex": train_ex, "query_ex": query_ex,
            "record": {"attributions": str(attr.path.resolve()), "method": m.get("method"),
                       "weights": m.get("weights"), "lambda": m.get("lambda")}}


def tail_patch_run(run, train_features, queries, out, *, method="trak", kernel: str = DEFAULT_KERNEL, c=None,
                   weights_path=None, learning_queries=None, attributions=None, k: int = 10, lr: float = 1e-2,
                   num_queries=None, random_seed: int = 0, grid: OutputGrid = OutputGrid(), seed: int = 0,
                   progress: bool = True) -> dict:
    """Δ per query for the top-k (uniform; learned with `weights_path`, or a weighted `attributions` output) and k
    random training examples; writes OUT/tail_patch.json."""
    start = time.perf_counter()
    if int(k) != k or k < 1:
        raise UserError(f"--top-k must be a positive integer, got {k}")
    if not lr > 0:
        raise UserError(f"--lr must be a positive number, got {lr}")
    adapter = adapter_of(run)
    check_can_write(out)
    ckpt = adapter.load(run)
    if attributions is not None:
        sel = _attribution_sets(run, attributions, k=k, num_queries=num_queries)
    else:
        sel = _store_sets(adapter, ckpt, train_features, queries, method=method, kernel=kernel, c=c,
                          weights_path=weights_path, learning_queries=learning_queries, k=k, num_queries=num_queries,
                          progress=progress)
    sets, train_ex, query_ex, ids = sel["sets"], sel["train_ex"], sel["query_ex"], np.asarray(sel["train_ids"])
    kinds = list(sets)
    nq = len(query_ex.ids)
    rng = np.random.default_rng(int(random_seed))
    sets["random"] = np.stack([rng.choice(len(ids), size=int(k), replace=False) for _ in range(nq)])
    objective = adapter.objective(ckpt, STEP_MEASUREMENT, grid.num_timesteps, grid.seed)
    sign = 1.0 if adapter.output_is_loss else -1.0
    base = adapter.outputs(ckpt, query_ex, grid)
    deltas = {name: sign * (base - patched_outputs(adapter, ckpt, objective, train_ex, query_ex, rows, lr, grid,
                                                   progress=progress))
              for name, rows in sets.items()}
    per_query = [{"query_id": int(query_ex.ids[q]), "output": float(base[q]),
                  **{f"delta_{name}": float(deltas[name][q]) for name in sets},
                  **{f"{name}_ids": [int(i) for i in ids[sets[name][q]]] for name in sets}} for q in range(nq)]
    summary = {f"delta_{name}": mean_ci(deltas[name], seed) for name in sets}
    for name in kinds:
        summary[f"delta_{name}_minus_random"] = mean_ci(deltas[name] - deltas["random"], seed)
    if "learned" in kinds:
        summary["delta_learned_minus_uniform"] = mean_ci(deltas["learned"] - deltas["uniform"], seed)
    doc = {"summary": {"n_queries": nq, **summary}, "per_query": per_query,
           "manifest": {"format": "gradtrace-tail-patch", "format_version": 1, "command": command_line(),
                        "run": str(Path(run).resolve()), "run_fingerprint": ckpt.fingerprint, **sel["record"],
                        "k": int(k), "lr": float(lr),
                        "step": f"one SGD step on the mean '{STEP_MEASUREMENT}' of the k examples",
                        "random_seed": int(random_seed), "bootstrap_seed": int(seed),
                        "model_output": {"name": adapter.output_name, "grid": grid.info(),
                                         "delta": "decrease of the loss" if adapter.output_is_loss
                                         else "increase of the output"},
                        "versions": versions()},
           "wall_s": round(time.perf_counter() - start, 3)}
    write_json_atomic(Path(out) / RESULT, doc)
    return doc


def tail_patch_table(doc: dict) -> str:
    """The means over queries (with 95% CIs) of each set's Δ, as a Markdown table."""
    lines = ["| top-k of | mean Δ | 95% CI |", "|---|---|---|"]
    for key, value in doc["summary"].items():
        if key.startswith("delta_"):
            lo, hi = value["ci95"]
            ci = "" if lo is None else f"[{lo:+.5f}, {hi:+.5f}]"
            lines.append(f"| {key[len('delta_'):].replace('_', ' ')} | {value['mean']:+.5f} | {ci} |")
    return "\n".join(lines)
