"""`gradtrace demo`: the whole pipeline on an embedded default (scikit-learn's 8×8 digits).

Train the tiny unconditional UNet (reused when an identical checkpoint is already in --out), generate
query images, featurize the training set and the queries, learn group weights without labels on generated
learning queries, attribute with TRAK under uniform and learned weights, and write ``attributions.json`` and
``report.png`` (uniform), ``learned/`` (learned) and ``report.html`` (both side by side, with the weights)
into --out, with ``demo.json`` recording settings and timings (`gradtrace.pipeline.demo_method`).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from gradtrace.pipeline.demo_clock import DemoClock
from gradtrace.pipeline.demo_method import uniform_and_learned
from gradtrace.pipeline.demo_t2i import run_text_to_image_demo
from gradtrace.pipeline.featurize import FeaturizeSpec, feature_spec, featurize_run
from gradtrace.pipeline.sample import SampleSpec, sample_run
from gradtrace.pipeline.specs.demo import DemoSpec
from gradtrace.pipeline.train import TrainSpec, train_run

SETTINGS = {
    "quick": {"n_train": 300, "steps": 400, "n_queries": 6, "sample_steps": 25, "dim": 512, "timesteps": 4,
              "top_k": 6, "n_learn": 16},
    "full": {"n_train": None, "steps": 3000, "n_queries": 12, "sample_steps": 50, "dim": None, "timesteps": 10,
             "top_k": 8, "n_learn": 48},
}


def run_demo(spec: DemoSpec, *, progress: bool = True, settings: dict | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Train, sample, featurize, attribute and draw on digits; `settings` overrides SETTINGS[mode] (tests);
    `log` receives one line per stage and a summary (the CLI prints them)."""
    log = log or (lambda line: None)
    if spec.text_to_image:
        return run_text_to_image_demo(spec.out, quick=spec.quick, progress=progress, settings=settings, log=log)
    mode = "quick" if spec.quick else "full"
    s = {**SETTINGS[mode], **(settings or {})}
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = DemoClock(log, progress)
    stage = clock.stage
    ckpt = str(stage("train", train_run, TrainSpec(data="digits", out=str(out / f"model-{mode}"), n=s["n_train"],
                                                   steps=s["steps"])))
    stage("sample", sample_run, SampleSpec(checkpoint=ckpt, out=str(out / "queries"), num=s["n_queries"],
                                           sample_steps=s["sample_steps"], seed=2024))
    features = dict(groups="block", dim=s["dim"], measurement="loss",  # the default projection; dim None: its default
                    timesteps=s["timesteps"], overwrite=True)
    train_store = stage("featurize-train", featurize_run,
                        FeaturizeSpec(checkpoint=ckpt, out=str(out / "features" / "train"), **features))
    query_spec = FeaturizeSpec(checkpoint=ckpt, out=str(out / "features" / "queries"), samples=str(out / "queries"),
                               **features)
    stage("featurize-queries", featurize_run, query_spec)
    doc = uniform_and_learned(clock, out, str(train_store.path), query_spec.out, n_learn=s["n_learn"],
                              sample_steps=s["sample_steps"], top_k=s["top_k"],
                              title="gradtrace demo: digits, tiny diffusion UNet, TRAK")
    n_rows = len(train_store.ids)
    rate = round(n_rows * s["timesteps"] / clock.timings["featurize-train"], 1)
    return clock.finish(out, {"mode": mode, "settings": s, "feature_spec": asdict(feature_spec(query_spec)),
                              "train_examples": n_rows, "featurize_examples_x_timesteps_per_s": rate}, doc,
                        f"query {doc['queries'][0]['query_id']}")
