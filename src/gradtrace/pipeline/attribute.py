"""The attribute stage: each query's top-k training examples with per-group breakdown, and report.png."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradtrace.attribution import query_side_for, score_queries, write_attributions
from gradtrace.attribution.sharded import attribute_sharded
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, learning_queries_option, method_option
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.ranks import rank_and_world
from gradtrace.report.attributions import draw_attributions, is_text_store, write_text_attributions


@dataclass
class AttributeSpec(Spec):
    train: str = option(None, "feature store of the training set", required=True)
    queries: str = option(None, "feature store of the queries", required=True)
    out: str = option(None, "output directory", required=True)
    method: str = method_option()
    kernel: str = kernel_option()
    lambda_c: str | float | None = lambda_c_option()
    learning_queries: str | None = learning_queries_option()
    top_k: int = option(10, "training examples kept per query", check=positive)
    weights: str | None = option(None, "group weights: a learn-weights JSON file, or {\"weights\": {group: w}}",
                                 type=str)
    aspect: str | None = option(None, "use the store's learned weights for this aspect (e.g. style)", type=str)
    report: bool = option(True, "skip report.png", flag="--no-report")

    def validate(self) -> None:
        if self.weights is not None and self.aspect is not None:
            raise UserError("pass either --weights FILE or --aspect NAME, not both")


def attribute_run(spec: AttributeSpec, *, progress: bool = True) -> dict | None:
    """Score the queries (one recipe: `gradtrace.attribution`), write the attributions and the report.

    Under torchrun (WORLD_SIZE > 1) each rank scores its rows of the store and the last rank writes the same
    artefact (`gradtrace.attribution.sharded`); the other ranks return None."""
    rank, world = rank_and_world()
    if world > 1:
        doc = attribute_sharded(spec.train, spec.queries, spec.out, rank=rank, world=world, method=spec.method,
                                kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights, aspect=spec.aspect,
                                learning_queries=spec.learning_queries, top_k=spec.top_k, spec=spec.to_dict(),
                                progress=progress)
        if doc is None:
            return None
        train, queries = FeatureStore.open(spec.train, require_complete=False), FeatureStore.open(spec.queries)
    else:
        train = FeatureStore.open(spec.train)
        queries = FeatureStore.open(spec.queries)
        scored = score_queries(train, queries, method=spec.method, kernel=spec.kernel, c=spec.lambda_c,
                               weights_path=spec.weights, aspect=spec.aspect, learning_queries=spec.learning_queries,
                               query_side=query_side_for(train, spec.kernel), progress=progress)
        doc = write_attributions(scored, train, queries, spec.out, top_k=spec.top_k, progress=progress,
                                 spec=spec.to_dict())
    if spec.report and is_text_store(train):
        write_text_attributions(train, queries, doc, Path(spec.out) / "report.md")
    elif spec.report:
        draw_attributions(train, queries, doc, Path(spec.out) / "report.png")
    return doc
