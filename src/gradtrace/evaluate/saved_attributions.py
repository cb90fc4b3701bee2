"""`gradtrace eval lds --attributions DIR`: the LDS of a finished attribute output whose method scored the model
directly (EK-FAC: no feature store), from its dense arrays.

Such an output holds scores.npy (Q, N) with the id order of its rows and columns (query_ids.npy, train_ids.npy),
contributions.npy (Q, N, M) when it was small enough (for `--per-group`), and its sources and model fingerprint in
attributions.json. The run's retraining gives the subset mask and, by the adapter, each query's output under every
retrained model (the same cache as the feature-store path); the attributions must come from the run's model and
cover exactly its training ids.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from gradtrace.attribution.run_check import check_run
from gradtrace.errors import UserError
from gradtrace.evaluate.eval_lds import PLOT, RESULT, finished_retraining, targets_from_outputs
from gradtrace.evaluate.outputs import OutputGrid, model_outputs
from gradtrace.io import check_can_write, command_line, read_json, sha256_arrays, versions, write_json_atomic
from gradtrace.metrics.lds import lds, lds_per_query, subset_mask, subset_predictions, summarize
from gradtrace.report.lds import plot_per_group

ARRAYS = ("scores.npy", "train_ids.npy", "query_ids.npy")


@dataclasses.dataclass
class Attributions:
    path: Path
    doc: dict
    scores: np.ndarray          # (Q, N) τ_w as written
    train_ids: np.ndarray
    query_ids: np.ndarray
    contributions: np.ndarray | None  # (Q, N, M) unweighted c_j, when written

    @property
    def manifest(self) -> dict:
        return self.doc["manifest"]


def read_attributions(folder) -> Attributions:
    """A finished dense attribute output (see the module docstring), refusing anything else in one line."""
    path = Path(folder)
    file = path / "attributions.json"
    if not file.is_file():
        raise UserError(f"{path} has no attributions.json; pass the output folder of `attribute --method ekfac`")
    doc = read_json(file, "attributions file")
    manifest = doc.get("manifest") if isinstance(doc, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != "gradtrace-attributions":
        raise UserError(f"{file} is not a gradtrace attributions file; pass an attribute output folder")
    check_run(path, doc)  # the run's arrays whole and agreeing with its document
    missing = [a for a in ARRAYS if not (path / a).is_file()]
    if missing:
        raise UserError(f"{path} has no {missing[0]} (attributions scored from feature stores, or too large to keep "
                        "dense); evaluate them with --train-features and --queries instead")
    scores, train_ids, query_ids = (np.load(path / a) for a in ARRAYS)
    contrib = np.load(path / "contributions.npy") if (path / "contributions.npy").is_file() else None
    if scores.shape != (len(query_ids), len(train_ids)) or (contrib is not None and contrib.shape[:2] != scores.shape):
        raise UserError(f"the arrays in {path} do not match each other; rerun the attribute command")
    return Attributions(path, doc, scores.astype(np.float64), train_ids.astype(np.int64), query_ids.astype(np.int64),
                        contrib)


def check_for_run(attr: Attributions, recipe) -> None:
    """Refuse attributions not made from the run's model or not covering exactly its training ids."""
    if attr.manifest.get("model_fingerprint") != recipe.fingerprint:
        raise UserError(f"the attributions {attr.path} were not made from the run's model {recipe.run}")
    if not np.array_equal(np.sort(attr.train_ids), recipe.train_ids):
        raise UserError(f"the attributions {attr.path} score {len(attr.train_ids)} training examples, not the run's "
                        f"{len(recipe.train_ids)} training ids")


def examples_in_order(recipe, source: dict, ids):
    """The run's adapter's examples of `ids` from `source`, in the order of `ids`."""
    ex = recipe.adapter.examples(recipe.model_config, source, ids=ids)
    pos = {int(i): r for r, i in enumerate(ex.ids)}
    return ex.take([pos[int(i)] for i in ids])


def query_examples(attr: Attributions, recipe):
    """The queries' examples (from the recorded source), in the order of the attributions' rows."""
    return examples_in_order(recipe, attr.manifest["query_source"], attr.query_ids)


def attribution_selection(folder, recipe, num_queries: int, k: int) -> dict:
    """`eval counterfactual --attributions`: the first queries, their top-k training ids by the written scores
    (sorted ids), and what to record (the same keys as the feature-store selection)."""
    attr = read_attributions(folder)
    check_for_run(attr, recipe)
    nq = min(int(num_queries), len(attr.query_ids))
    idx = np.argsort(-attr.scores[:nq], axis=1, kind="stable")[:, :int(k)]
    m = attr.manifest
    return {"top_ids": np.sort(attr.train_ids[idx], axis=1), "query_ids": attr.query_ids[:nq],
            "method": m.get("method"), "weights": m.get("weights"), "lambda": m.get("lambda"),
            "queries": str(attr.path.resolve()), "examples": lambda: query_examples(attr, recipe).take(np.arange(nq))}


def lds_of_attributions(run, retrain, attributions, out, *, per_group: bool = False,
                        grid: OutputGrid = OutputGrid(), seed: int = 0, progress: bool = True) -> dict:
    """LDS (mean, 95% CI, per query) of a dense attribute output; writes lds.json (+ per group with `per_group`)."""
    start = time.perf_counter()
    recipe, retraining = finished_retraining(run, retrain)
    check_can_write(out)
    attr = read_attributions(attributions)
    check_for_run(attr, recipe)
    if per_group and attr.contributions is None:
        raise UserError(f"{attr.path} has no contributions.npy (too large to keep); drop --per-group")
    adapter = recipe.adapter
    ex = query_examples(attr, recipe)
    outputs, info = model_outputs(adapter, list(zip(retraining.jobs, retraining.model_paths())), ex,
                                  retraining.path / "outputs", grid, progress=progress)
    targets = targets_from_outputs(outputs, retraining.n_subsets, retraining.n_seeds, negate=adapter.output_is_loss)
    mask = subset_mask(retraining.subsets, attr.train_ids)
    result = lds(attr.scores, mask, targets, query_ids=attr.query_ids, seed=seed)
    m = attr.manifest
    doc = {"manifest": {"format": "gradtrace-lds", "format_version": 1, "command": command_line(),
                        "run": retraining.manifest.get("run"), "retrain": str(retraining.path.resolve()),
                        "subsets": retraining.settings["subsets"], "seeds": retraining.seeds,
                        "attributions": str(attr.path.resolve()), "query_source": m.get("query_source"),
                        "query_ids_sha256": sha256_arrays([attr.query_ids]), "method": m.get("method"),
                        "groups": attr.doc.get("groups"), "measurement": m.get("measurement"),
                        "weights": m.get("weights"), "lambda": m.get("lambda"),
                        "model_output": {"name": adapter.output_name, "grid": grid.info(),
                                         "target": ("negative loss" if adapter.output_is_loss else "output")
                                                   + ", mean over seeds", "cache": info.get("path")},
                        "bootstrap_seed": seed, "versions": versions()},
           "lds": result}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if per_group:
        doc["per_group"] = {}
        for j, name in enumerate(attr.doc["groups"]):
            per_q = lds_per_query(subset_predictions(attr.contributions[..., j].astype(np.float64), mask), targets)
            doc["per_group"][name] = summarize(per_q, query_ids=attr.query_ids, seed=seed)
        plot_per_group(doc["per_group"], result, out / PLOT,
                       f"LDS per parameter group alone ({(m.get('method') or {}).get('method', '?')})")
        doc["per_group_plot"] = str(out / PLOT)
    doc["wall_s"] = round(time.perf_counter() - start, 3)
    write_json_atomic(out / RESULT, doc)
    return doc
