"""`gradtrace demo`: the whole pipeline on an embedded default (scikit-learn's 8×8 digits).

Train the tiny unconditional UNet (reused when an identical checkpoint is already in --out), generate
query images, featurize the training set and the queries, attribute with TRAK, and write
``attributions.json`` and ``report.png`` into --out, with ``demo.json`` recording settings and timings.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from gradtrace.io import versions, write_json_atomic
from gradtrace.pipeline.attribute import AttributeSpec, attribute_run
from gradtrace.pipeline.demo_t2i import run_text_to_image_demo
from gradtrace.pipeline.featurize import FeaturizeSpec, featurize_run
from gradtrace.pipeline.sample import SampleSpec, sample_run
from gradtrace.pipeline.spec import Spec, option
from gradtrace.pipeline.train import TrainSpec, train_run

SETTINGS = {
    "quick": {"n_train": 300, "steps": 400, "n_queries": 6, "sample_steps": 25, "dim": 512, "timesteps": 4,
              "top_k": 6},
    "full": {"n_train": None, "steps": 3000, "n_queries": 12, "sample_steps": 50, "dim": 2048, "timesteps": 10,
             "top_k": 8},
}


@dataclass
class DemoSpec(Spec):
    out: str = option("demo_out", "output directory")
    quick: bool = option(False, "tiny settings (about a minute)")
    text_to_image: bool = option(False, "the text-to-image path instead: a small SD-layout pipeline, LoRA, prompts")


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
    timings: dict[str, float] = {}

    def stage(name, fn, *a, **kw):
        t = time.perf_counter()
        log(f"[demo] {name} ...")
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t, 2)
        return result

    start = time.perf_counter()
    ckpt = str(stage("train", train_run, TrainSpec(data="digits", out=str(out / f"model-{mode}"), n=s["n_train"],
                                                   steps=s["steps"]), progress=progress))
    stage("sample", sample_run, SampleSpec(checkpoint=ckpt, out=str(out / "queries"), num=s["n_queries"],
                                           sample_steps=s["sample_steps"], seed=2024), progress=progress)
    features = dict(groups="block", projection="rademacher", dim=s["dim"], measurement="loss",
                    timesteps=s["timesteps"], overwrite=True)
    train_store = stage("featurize-train", featurize_run,
                        FeaturizeSpec(checkpoint=ckpt, out=str(out / "features" / "train"), **features),
                        progress=progress)
    query_spec = FeaturizeSpec(checkpoint=ckpt, out=str(out / "features" / "queries"), samples=str(out / "queries"),
                               **features)
    stage("featurize-queries", featurize_run, query_spec, progress=progress)
    doc = stage("attribute", attribute_run,
                AttributeSpec(train=str(train_store.path), queries=query_spec.out, out=str(out), method="trak",
                              kernel="per-group", top_k=s["top_k"]), progress=progress)
    timings["total"] = round(time.perf_counter() - start, 2)
    n_rows = len(train_store.ids)
    summary = {"mode": mode, "settings": s, "feature_spec": asdict(query_spec.feature_spec()), "timings_s": timings,
               "train_examples": n_rows,
               "featurize_examples_x_timesteps_per_s": round(n_rows * s["timesteps"] / timings["featurize-train"], 1),
               "outputs": {"attributions": str(out / "attributions.json"), "report": str(out / "report.png")},
               "versions": versions()}
    write_json_atomic(out / "demo.json", summary)
    first = doc["queries"][0]
    log(f"[demo] query {first['query_id']}: top training ids {[t['train_id'] for t in first['top']]}")
    log(f"[demo] done in {timings['total']:.1f} s: {out / 'attributions.json'}, {out / 'report.png'}")
    return summary
