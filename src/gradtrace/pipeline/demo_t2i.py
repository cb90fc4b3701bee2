"""`gradtrace demo --text-to-image`: the text-to-image path on an embedded default (shapes with captions).

Build and pretrain the small Stable-Diffusion-layout pipeline (reused when identical), fine-tune LoRA adapters
on a subset of captioned shapes, generate queries from prompts, featurize the training images (LoRA factors
only) and the queries, learn group weights on generated learning prompts, attribute with TRAK under uniform and
learned weights, and write the outputs of `gradtrace.pipeline.demo_method` and ``demo.json`` into --out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from gradtrace.pipeline.build_pipeline import BuildPipelineSpec, build_pipeline_run
from gradtrace.pipeline.demo_clock import DemoClock
from gradtrace.pipeline.demo_method import uniform_and_learned
from gradtrace.pipeline.featurize import FeaturizeSpec, featurize_run
from gradtrace.pipeline.sample import SampleSpec, sample_run
from gradtrace.pipeline.train import TrainSpec, train_run

PROMPTS = ["a striped circle on a plain background", "a dotted square on a checker background",
           "a solid triangle on a gradient background", "an outlined diamond on a noise background"]
SETTINGS = {
    "quick": {"vae_steps": 300, "unet_steps": 300, "n_train": 96, "lora_steps": 100, "rank": 4, "sample_steps": 20,
              "guidance": 2.0, "dim": 512, "timesteps": 4, "top_k": 6,
              "n_learn": 16},
    "full": {"vae_steps": None, "unet_steps": None, "n_train": 192, "lora_steps": 400, "rank": 4, "sample_steps": 50,
             "guidance": 3.0, "dim": None, "timesteps": 10, "top_k": 8,
             "n_learn": 32},
}


def run_text_to_image_demo(out, *, quick: bool, progress: bool = True, settings: dict | None = None,
                           log: Callable[[str], None] | None = None) -> dict:
    log = log or (lambda line: None)
    mode = "quick" if quick else "full"
    s = {**SETTINGS[mode], **(settings or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = DemoClock(log, progress)
    stage = clock.stage
    steps = {k: s[k] for k in ("vae_steps", "unet_steps") if s[k] is not None}
    pipe = str(stage("build-pipeline", build_pipeline_run, BuildPipelineSpec(out=str(out / f"pipeline-{mode}"),
                                                                             **steps)))
    run = str(stage("fine-tune", train_run, TrainSpec(data="shapes", n=s["n_train"], base=pipe, lora_rank=s["rank"],
                                                      steps=s["lora_steps"], batch_size=16,
                                                      out=str(out / f"lora-{mode}"))))
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    stage("sample", sample_run, SampleSpec(checkpoint=run, prompts=str(out / "prompts.txt"), out=str(out / "queries"),
                                           guidance=s["guidance"], sample_steps=s["sample_steps"], seed=2024))
    features = dict(dim=s["dim"], timesteps=s["timesteps"], overwrite=True)
    train = stage("featurize-train", featurize_run,
                  FeaturizeSpec(checkpoint=run, out=str(out / "features" / "train"), **features))
    queries = FeaturizeSpec(checkpoint=run, samples=str(out / "queries"), out=str(out / "features" / "queries"),
                            **features)
    stage("featurize-queries", featurize_run, queries)
    doc = uniform_and_learned(clock, out, str(train.path), queries.out, n_learn=s["n_learn"],
                              sample_steps=s["sample_steps"], top_k=s["top_k"], guidance=s["guidance"],
                              title="gradtrace demo: text-to-image LoRA fine-tune on shapes, TRAK")
    return clock.finish(out, {"mode": f"text-to-image {mode}", "settings": s, "prompts": PROMPTS,
                              "train_examples": len(train.ids)}, doc, f"'{PROMPTS[0]}'")
