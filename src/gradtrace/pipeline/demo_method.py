"""The method's part of both demos: learn group weights without labels on generated learning queries, attribute
the queries with uniform and with learned weights (the same λ, chosen on the learning queries), and write the
side-by-side HTML report.

    OUT/attributions.json, OUT/report.png          uniform weights (the base method)
    OUT/learned/attributions.json, report.png      learned weights
    OUT/weights.json                               the learned weights and their provenance
    OUT/weights/                                   the generated learning queries and their features
    OUT/report.html                                both runs per query, the weights chart, the manifests
"""
from __future__ import annotations

from pathlib import Path

from gradtrace.pipeline.attribute import AttributeSpec, attribute_run
from gradtrace.pipeline.demo_clock import DemoClock
from gradtrace.pipeline.learn_weights import LearnWeightsSpec, learn_weights_run
from gradtrace.pipeline.report import ReportSpec, report_run


def uniform_and_learned(clock: DemoClock, out: Path, train_store: str, query_store: str, *, n_learn: int,
                        sample_steps: int, top_k: int, guidance: float = 1.0, title: str) -> dict:
    """Run the stages above; returns the uniform run's attributions document."""
    weights, wdoc = clock.stage("learn-weights", learn_weights_run, LearnWeightsSpec(
        train=train_store, generate=n_learn, sample_steps=sample_steps, guidance=guidance, sample_seed=7,
        out=str(out / "weights.json")))
    # both runs use the λ scale learn-weights chose on the learning queries, so only the weights differ
    common = dict(train=train_store, queries=query_store, top_k=top_k, lambda_c=wdoc["provenance"]["lambda_c"])
    doc = clock.stage("attribute", attribute_run, AttributeSpec(out=str(out), **common))
    clock.stage("attribute-learned", attribute_run, AttributeSpec(out=str(out / "learned"), weights=str(weights),
                                                                  **common))
    clock.stage("report", report_run, ReportSpec(attributions=[str(out), str(out / "learned")],
                                                 weights=[str(weights)], out=str(out / "report.html"), title=title))
    return doc
