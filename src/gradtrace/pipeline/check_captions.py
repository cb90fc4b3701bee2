"""The check-captions stage: does a text-to-image model render its training captions? No labels, no judge model.

    result = check_captions_run(CheckCaptionsSpec(checkpoint="runs/sd-shapes"))
    # {"words": 0.93, "words_chance": 0.62, "exact": 0.80, "exact_chance": 0.01, "above_chance": 0.82, ...}

A seeded draw of distinct training captions is each sampled `per_caption` times (a few DDIM steps); each image's
nearest training image in pixels then says what it shows (`gradtrace.evaluate.caption_fidelity`). build-pipeline
runs the same check on the folder it has just saved and records it in its manifest; near chance, a warning says
that attribution by aspect on this model will mean little and how to train longer.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from gradtrace.adapters import adapter_of
from gradtrace.adapters.diffusers.latents import fit_resolution
from gradtrace.data.sources import dataset_source, open_dataset
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.evaluate.caption_fidelity import caption_fidelity, fidelity_line, poorly_rendered
from gradtrace.io import command_line, read_json, versions, write_json_atomic
from gradtrace.pipeline.build_manifest import MANIFEST
from gradtrace.pipeline.specs.check_captions import CheckCaptionsSpec
from gradtrace.pipeline.specs.sample import SampleSpec

FORMAT = "gradtrace-caption-fidelity"
SETTINGS = ("captions", "per_caption", "sample_steps", "guidance", "seed")


def check_captions_run(spec: CheckCaptionsSpec, *, progress: bool = True) -> dict:
    """The fidelity of `spec.checkpoint` on its training captions (warned when near chance); --out gets the JSON."""
    path = Path(spec.checkpoint)
    adapter = adapter_of(path)
    checkpoint = adapter.load(path)
    if checkpoint.model_config.get("kind") != "text-to-image":
        raise UserError(f"{path} is not a text-to-image model; check-captions needs a pipeline with a text encoder "
                        "(a build-pipeline folder or a LoRA run on one)")
    images, captions, hint = _training_data(spec, path, checkpoint)
    result = fidelity_of(adapter, checkpoint, images, captions, spec, hint=hint, progress=progress)
    if spec.out is not None:
        write_json_atomic(spec.out, {"format": FORMAT, "checkpoint": str(path.resolve()),
                                     "model_fingerprint": checkpoint.fingerprint, "spec": spec.to_dict(),
                                     "command": command_line(), "fidelity": result, "versions": versions()})
    return result


def fidelity_of(adapter, checkpoint, images, captions: list[str], spec, *, hint: str, progress: bool) -> dict:
    """Sample the seeded captions with the loaded `checkpoint` and judge them against `images` (N, C, H, W) and
    their `captions`; warns (GradtraceWarning) when near chance, naming `hint`, the way to train longer."""
    distinct = list(dict.fromkeys(map(str, captions)))
    rng = np.random.default_rng([int(spec.seed), 5167])
    chosen = [distinct[i] for i in sorted(rng.choice(len(distinct), size=min(spec.captions, len(distinct)),
                                                     replace=False))]
    prompts = [c for c in chosen for _ in range(spec.per_caption)]
    defaults = SampleSpec(checkpoint=".", out=".")
    generated, _ = adapter.sample(checkpoint, len(prompts), prompts=prompts, guidance_scale=spec.guidance,
                                  steps=spec.sample_steps, sampler=defaults.sampler, seed=spec.seed, eta=defaults.eta,
                                  progress=progress)
    resolution = int(checkpoint.model_config["resolution"])
    result = caption_fidelity(generated, prompts, fit_resolution(images, resolution), list(map(str, captions)))
    result.pop("nearest")
    result["settings"] = {k: getattr(spec, k) for k in SETTINGS}
    result["checked"] = chosen
    why = poorly_rendered(result)
    if why is not None:
        warnings.warn(GradtraceWarning(f"{fidelity_line(result)}; {why}: aspect attribution on this pipeline will "
                                       f"mean little; {hint}"))
    return result


def _training_data(spec: CheckCaptionsSpec, path: Path, checkpoint):
    """The training images, their captions and the hint to train longer: from --data, else from the run's
    recorded dataset (its training rows) or the build manifest beside a pipeline folder."""
    config = checkpoint.config
    rows = None
    if spec.data is not None:
        source, hint = dataset_source(spec.data, n=spec.n, seed=spec.data_seed), "train it longer"
    elif isinstance(config.get("dataset"), dict) and config["dataset"].get("source"):
        steps = (config.get("train_config") or {}).get("steps")
        source = config["dataset"]["source"]
        hint = f"fine-tune longer: train --steps {2 * int(steps)}" if steps else "fine-tune it longer (train --steps)"
        rows = checkpoint.model.train_ids
    elif (path / MANIFEST).is_file():
        build = read_json(path / MANIFEST, "build manifest").get("spec") or {}
        source = dataset_source(build.get("data", "shapes"), n=build.get("n"), size=build.get("size"),
                                seed=build.get("data_seed", 0))
        hint = "build it again with more --unet-steps"
    else:
        raise UserError(f"{path} records no training data; pass --data with its captioned training images")
    dataset = open_dataset(source)
    picked = np.arange(len(dataset)) if rows is None else dataset.index_of(rows)
    captions = [dataset.metadata[int(r)].get("text") for r in picked]
    if any(not isinstance(c, str) or not c.strip() for c in captions):
        raise UserError(f"dataset '{dataset.name}' has images without a \"text\" caption; check-captions needs "
                        "captioned data: shapes, or imagefolder:PATH whose metadata.jsonl gives every image a \"text\"")
    return dataset.images[picked], captions, hint
