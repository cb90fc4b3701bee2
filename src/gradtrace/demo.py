"""`gradtrace demo`: the whole pipeline on an embedded default (scikit-learn's 8×8 digits).

Train the tiny unconditional UNet (reused when an identical checkpoint is already in --out), generate
query images, featurize the training set and the queries, attribute with TRAK, and write
``attributions.json`` and ``report.png`` into --out, with ``demo.json`` recording settings and timings.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from gradtrace.commands import attribute_run, featurize_run, sample_run, train_run
from gradtrace.features.featurize import FeatureSpec
from gradtrace.manifest import versions, write_json_atomic

SETTINGS = {
    "quick": {"n_train": 300, "steps": 400, "n_queries": 6, "sample_steps": 25, "dim": 512, "timesteps": 4,
              "top_k": 6},
    "full": {"n_train": None, "steps": 3000, "n_queries": 12, "sample_steps": 50, "dim": 2048, "timesteps": 10,
             "top_k": 8},
}


def run_demo(out, *, quick: bool = False, progress: bool = True, settings: dict | None = None) -> dict:
    mode = "quick" if quick else "full"
    s = {**SETTINGS[mode], **(settings or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name, fn, *a, **kw):
        t = time.perf_counter()
        if progress:
            print(f"[demo] {name} ...", flush=True)
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t, 2)
        return result

    start = time.perf_counter()
    ckpt = stage("train", train_run, "digits", out / f"model-{mode}", n=s["n_train"], steps=s["steps"],
                 progress=progress)
    stage("sample", sample_run, ckpt, out / "queries", num=s["n_queries"], sample_steps=s["sample_steps"],
          seed=2024, progress=progress)
    spec = FeatureSpec(groups="block", projection="rademacher", total_dim=s["dim"], measurement="loss",
                       num_timesteps=s["timesteps"])
    train_store = stage("featurize-train", featurize_run, ckpt, out / "features" / "train", spec=spec,
                        overwrite=True, progress=progress)
    stage("featurize-queries", featurize_run, ckpt, out / "features" / "queries", samples=out / "queries",
          spec=spec, overwrite=True, progress=progress)
    doc = stage("attribute", attribute_run, train_store.path, out / "features" / "queries", out,
                method="trak", kernel="per-group", top_k=s["top_k"], progress=progress)
    timings["total"] = round(time.perf_counter() - start, 2)
    n_rows = len(train_store.ids)
    summary = {"mode": mode, "settings": s, "feature_spec": asdict(spec), "timings_s": timings,
               "train_examples": n_rows,
               "featurize_examples_x_timesteps_per_s": round(n_rows * s["timesteps"] / timings["featurize-train"], 1),
               "outputs": {"attributions": str(out / "attributions.json"), "report": str(out / "report.png")},
               "versions": versions()}
    write_json_atomic(out / "demo.json", summary)
    if progress:
        first = doc["queries"][0]
        print(f"[demo] query {first['query_id']}: top training ids "
              f"{[t['train_id'] for t in first['top']]}")
        print(f"[demo] done in {timings['total']:.1f} s: {out / 'attributions.json'}, {out / 'report.png'}")
    return summary
