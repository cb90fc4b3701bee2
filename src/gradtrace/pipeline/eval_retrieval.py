"""The `eval retrieval` stage: Recall@k and mAP per aspect (label column) of attribution runs over the same queries.

    eval_retrieval(EvalRetrievalSpec(attributions=["out/uniform", "out/style"], labels="subject,style",
                                     out="out/retrieval"))
"""
from __future__ import annotations

from gradtrace.evaluate.eval_retrieval import eval_retrieval_run
from gradtrace.pipeline.specs.eval_retrieval import EvalRetrievalSpec, columns


def eval_retrieval(spec: EvalRetrievalSpec, *, progress: bool = True) -> dict:
    return eval_retrieval_run(spec.attributions, columns(spec.labels), spec.out, ks=spec.ks(),
                              n_bootstrap=spec.bootstrap, seed=spec.seed, train_labels=spec.train_labels,
                              query_labels=spec.query_labels)
