"""The attribute stage: each query's top-k training examples with per-group breakdown, and report.png.

It dispatches on the configured method (`method.needs_model`): a feature kernel (TracIn, TRAK, D-TRAK, DAS) scores
the query store against the training store; a method that needs the model (EK-FAC) scores the checkpoint's training
examples and the `--ids` examples directly (`gradtrace.pipeline.model_scoring`). Same weights, λ rule and artefact.
With `--compare-uniform`, the same scoring with uniform weights at the learned weights' c goes to OUT/uniform (so the
comparison of learned and uniform weights differs in the weights only).
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from gradtrace.attribution import query_side_for, score_queries, write_attributions
from gradtrace.attribution.sharded import attribute_sharded
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.extras import install_line, installed
from gradtrace.features.store import FeatureStore
from gradtrace.methods import configure, get_method
from gradtrace.pipeline.model_scoring import attribute_model_run, configure_model_method
from gradtrace.pipeline.specs.attribute import AttributeSpec
from gradtrace.ranks import rank_and_world
from gradtrace.report.attributions import draw_attributions, is_text_store, write_text_attributions

UNIFORM = "uniform"  # the --compare-uniform run, inside the output folder


def attribute_run(spec: AttributeSpec, *, progress: bool = True) -> dict | None:
    """Score the queries (one recipe: `gradtrace.attribution`), write the attributions and the report.

    Under torchrun (WORLD_SIZE > 1) a feature kernel's ranks each score their rows of the store and the last rank
    writes the same artefact (`gradtrace.attribution.sharded`); the other ranks return None."""
    if get_method(spec.method).needs_model:
        return attribute_model_run(configure_model_method(spec, spec.method), spec, progress=progress)
    method = configure(spec.method, kernel=spec.kernel)
    rank, world = rank_and_world()
    if world > 1:
        if spec.compare_uniform:
            raise UserError("--compare-uniform is not split over ranks; run the uniform attribute as its own command "
                            "(--lambda-c set to the learned weights' c), or run without torchrun")
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
    elif spec.report and not installed("matplotlib"):  # the picture is a side output: the attributions stand
        warnings.warn(GradtraceWarning("report.png is not drawn: matplotlib is not installed; "
                                       f"{install_line('matplotlib')} (or pass --no-report)"), stacklevel=2)
    elif spec.report:
        draw_attributions(train, queries, doc, Path(spec.out) / "report.png")
    if spec.compare_uniform:  # the fair baseline: uniform weights, everything else (c included) as scored above
        attribute_run(replace(spec, weights=None, aspect=None, lambda_c=scored.lambda_info["c"], learning_queries=None,
                              compare_uniform=False, out=str(Path(spec.out) / UNIFORM)), progress=progress)
    return doc
