"""Evaluation runners: the LDS by retraining on subsets, ground-truth model outputs, counterfactual retraining,
mislabel flips, tail-patch. The metrics they compute are pure functions in `gradtrace.metrics`.

    retrain_run(run, out, n_subsets=64, fraction=0.5, n_seeds=1, workers=2)          # gradtrace retrain
    eval_lds_run(run, retrain_dir, train_store, query_store, out, method="trak")      # gradtrace eval lds
    problem = load_problem(run, retrain_dir, train, queries); problem.evaluate(scores)  # any (Q, N) scores
    counterfactual_run(run, train_store, query_store, out, k=10)                      # gradtrace eval counterfactual
    mislabel_run(run, out, fraction=0.1)                                              # gradtrace eval mislabel

Names are imported on first use (the CLI imports this package at start-up).
"""
from importlib import import_module

_EXPORTS = {
    "gradtrace.evaluate.counterfactual": ["counterfactual_run", "counterfactual_table"],
    "gradtrace.evaluate.eval_lds": ["LDSProblem", "eval_lds_run", "load_problem", "per_group_lds"],
    "gradtrace.evaluate.flips": ["bilinear_self_influence", "flip_labels"],
    "gradtrace.evaluate.harness": ["Job", "train_jobs"],
    "gradtrace.evaluate.mislabel": ["mislabel_run", "mislabel_table", "model_self_influence",
                                    "store_self_influence"],
    "gradtrace.evaluate.outputs": ["OutputGrid", "model_outputs", "store_examples"],
    "gradtrace.evaluate.recipe": ["Recipe", "load_recipe"],
    "gradtrace.evaluate.retrain": ["Retraining", "open_retraining", "retrain_run"],
    "gradtrace.evaluate.subsets": ["draw_subsets", "load_subsets", "save_subsets"],
    # the metrics these runners compute, also at home in gradtrace.metrics
    "gradtrace.metrics.detection": ["detection_table", "roc_auc", "top_found"],
    "gradtrace.metrics.lds": ["lds", "lds_per_query", "subset_mask", "subset_predictions", "summarize"],
    "gradtrace.metrics.stats": ["bootstrap_ci"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gradtrace.evaluate' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
