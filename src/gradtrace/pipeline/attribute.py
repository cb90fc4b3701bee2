"""The attribute stage: each query's top-k training examples with per-group breakdown, and report.png.

It dispatches on the configured method (`method.needs_model`): a feature kernel (TracIn, TRAK, D-TRAK, DAS) scores
the query store against the training store; a method that needs the model (EK-FAC) scores the checkpoint's training
examples and the `--ids` examples directly (`gradtrace.pipeline.model_scoring`). Same weights, λ rule and artefact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradtrace.attribution import query_side_for, score_queries, write_attributions
from gradtrace.attribution.sharded import attribute_sharded
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods import configure, get_method
from gradtrace.pipeline.model_scoring import ModelInputs, attribute_model_run, configure_model_method
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, learning_queries_option, method_option
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.ranks import rank_and_world
from gradtrace.report.attributions import draw_attributions, is_text_store, write_text_attributions


@dataclass
class _AttributeOptions(Spec):
    train: str | None = option(None, "feature store of the training set (feature methods)", type=str)
    queries: str | None = option(None, "feature store of the queries (feature methods)", type=str)
    out: str = option(None, "output directory", required=True)
    method: str = method_option()
    kernel: str = kernel_option()
    lambda_c: str | float | None = lambda_c_option()
    learning_queries: str | None = learning_queries_option()
    learning_ids: object = option(None, "with --lambda-c auto, methods that need the model: ids of learning queries "
                                  "(never the --ids)", type=str)
    top_k: int = option(10, "training examples kept per query", check=positive)
    weights: str | None = option(None, "group weights: a learn-weights JSON file, or {\"weights\": {group: w}}",
                                 type=str)
    aspect: str | None = option(None, "use the store's learned weights for this aspect (e.g. style)", type=str)
    report: bool = option(True, "skip report.png", flag="--no-report")


@dataclass
class AttributeSpec(ModelInputs, _AttributeOptions):
    """The attribute stage's settings: the scoring options, then the model inputs of methods that need the model."""

    def validate(self) -> None:
        if self.weights is not None and self.aspect is not None:
            raise UserError("pass either --weights FILE or --aspect NAME, not both")
        if get_method(self.method).needs_model:
            for flag, value in (("--train", self.train), ("--queries", self.queries), ("--aspect", self.aspect),
                                ("--learning-queries", self.learning_queries)):
                if value is not None:
                    raise UserError(f"method '{self.method}' scores the model directly, not feature stores; drop "
                                    f"{flag} (use --checkpoint, --ids, --learning-ids)")
            self.check_model_inputs(self.method)
        elif self.train is None or self.queries is None:
            raise UserError("--train and --queries are required (feature stores; a method that needs the model, "
                            "e.g. ekfac, takes --checkpoint and --ids)")


def attribute_run(spec: AttributeSpec, *, progress: bool = True) -> dict | None:
    """Score the queries (one recipe: `gradtrace.attribution`), write the attributions and the report.

    Under torchrun (WORLD_SIZE > 1) a feature kernel's ranks each score their rows of the store and the last rank
    writes the same artefact (`gradtrace.attribution.sharded`); the other ranks return None."""
    if get_method(spec.method).needs_model:
        return attribute_model_run(configure_model_method(spec, spec.method), spec, progress=progress)
    method = configure(spec.method, kernel=spec.kernel)
    rank, world = rank_and_world()
    if world > 1:
        doc = attribute_sharded(spec.train, spec.queries, spec.out, rank=rank, world=world, method=method,
                                kernel=spec.kernel, c=spec.lambda_c, weights_path=spec.weights, aspect=spec.aspect,
                                learning_queries=spec.learning_queries, top_k=spec.top_k, spec=spec.to_dict(),
                                progress=progress)
        if doc is None:
            return None
        train, queries = FeatureStore.open(spec.train, require_complete=False), FeatureStore.open(spec.queries)
    else:
        train = FeatureStore.open(spec.train)
        queries = FeatureStore.open(spec.queries)
        scored = score_queries(train, queries, method=method, kernel=spec.kernel, c=spec.lambda_c,
                               weights_path=spec.weights, aspect=spec.aspect, learning_queries=spec.learning_queries,
                               query_side=query_side_for(train, spec.kernel), progress=progress)
        doc = write_attributions(scored, train, queries, spec.out, top_k=spec.top_k, progress=progress,
                                 spec=spec.to_dict())
    if spec.report and is_text_store(train):
        write_text_attributions(train, queries, doc, Path(spec.out) / "report.md")
    elif spec.report:
        draw_attributions(train, queries, doc, Path(spec.out) / "report.png")
    return doc
