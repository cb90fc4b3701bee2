"""Evaluation: the LDS by retraining on subsets, ground-truth model outputs, counterfactual retraining.

    retrain_run(run, out, n_subsets=64, fraction=0.5, n_seeds=1, workers=2)          # gradtrace retrain
    eval_lds_run(run, retrain_dir, train_store, query_store, out, method="trak")      # gradtrace eval lds
    problem = load_problem(run, retrain_dir, train, queries); problem.evaluate(scores)  # any (Q, N) scores
    counterfactual_run(run, train_store, query_store, out, k=10)                      # gradtrace eval counterfactual
    mislabel_run(run, out, fraction=0.1)                                              # gradtrace eval mislabel

Names are imported on first use (the CLI imports this package at start-up).
"""
from importlib import import_module

_EXPORTS = {
    "counterfactual": ["counterfactual_run", "counterfactual_table"],
    "detection": ["bilinear_self_influence", "detection_table", "flip_labels", "roc_auc", "top_found"],
    "eval_lds": ["LDSProblem", "eval_lds_run", "load_problem", "per_group_lds"],
    "harness": ["Job", "train_jobs"],
    "mislabel": ["mislabel_run", "mislabel_table", "model_self_influence", "store_self_influence"],
    "lds": ["bootstrap_ci", "lds", "lds_per_query", "subset_mask", "subset_predictions", "summarize"],
    "outputs": ["OutputGrid", "model_outputs", "store_examples"],
    "recipe": ["Recipe", "load_recipe"],
    "retrain": ["Retraining", "open_retraining", "retrain_run"],
    "subsets": ["draw_subsets", "load_subsets", "save_subsets"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gradtrace.evaluate' has no attribute {name!r}")
    return getattr(import_module(f"gradtrace.evaluate.{_WHERE[name]}"), name)
