"""The build-pipeline stage: a small text-to-image pipeline in the Stable Diffusion layout, made from configs and
pretrained on a captioned dataset on CPU (or reused, when `out` already holds an identical build).

    build_pipeline_run(BuildPipelineSpec(out="runs/sd-shapes"))   # 400 + 1,650 steps on the 960 shapes, then the check

The folder is written by `StableDiffusionPipeline.save_pretrained` (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/), so whatever reads Stable Diffusion 1.x/2.x folders reads it too; the
tokenizer folder also holds CLIP's vocab.json and merges.txt. `gradtrace_build.json` beside them records the
spec, the command, the dataset, the schedule (`training_schedule`), the losses, the caption fidelity
(`check-captions` on the saved folder) and the versions; it is written last, so it marks a finished build.
Captions are the "text" entry of each image's metadata (shapes has them; an imagefolder gets them from a
"text" column of its metadata.jsonl).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from gradtrace.adapters import adapter_of
from gradtrace.adapters.diffusers.build import build_components, save_pipeline
from gradtrace.adapters.diffusers.pretrain import pretrain
from gradtrace.data.sources import dataset_source, open_dataset
from gradtrace.errors import UserError
from gradtrace.io import check_can_write, command_line, versions, write_json_atomic
from gradtrace.pipeline.build_manifest import MANIFEST, finished_build
from gradtrace.pipeline.check_captions import fidelity_of
from gradtrace.pipeline.specs.build_pipeline import BuildPipelineSpec
from gradtrace.pipeline.specs.check_captions import CheckCaptionsSpec

FORMAT = "gradtrace-built-pipeline"

# The default schedule (when --vae-steps / --unet-steps are not given): every image seen EPOCHS times, within
# [FLOOR, CAP] steps. Measured on the 960 shapes (docs/benchmarks.md, "Capacity and caption fidelity"): the UNet's
# caption fidelity (above chance) was 0.70 after 800 steps (27 epochs), 0.92 after 1,600 (53 epochs; real held-out
# images 0.96), and on a 24-subject caption set of the same images 0.49 and 0.86. The distinct captions are
# recorded but not used: both sets have 96, and their fidelity differs; `check-captions` says what was learned.
VAE_EPOCHS, VAE_FLOOR, VAE_CAP = 12, 400, 2000
UNET_EPOCHS, UNET_FLOOR, UNET_CAP = 55, 800, 4000


def dataset_captions(dataset) -> list[str]:
    """Each image's "text" caption; refused when an image has none."""
    missing = [int(i) for i, meta in zip(dataset.ids, dataset.metadata)
               if not isinstance(meta.get("text"), str) or not meta["text"].strip()]
    if missing:
        raise UserError(f"dataset '{dataset.name}' has no \"text\" caption for {len(missing)} of {len(dataset)} "
                        f"images (first id {missing[0]}); use a captioned dataset: shapes, or imagefolder:PATH "
                        "whose metadata.jsonl gives every image a \"text\"")
    return [meta["text"] for meta in dataset.metadata]


def training_schedule(spec: BuildPipelineSpec, n_images: int, n_captions: int) -> dict:
    """The VAE and UNet steps: the spec's where given, else scaled to the number of images (see the constants
    above); recorded in the manifest with what they were chosen from."""
    def scaled(epochs: int, floor: int, cap: int) -> int:
        return int(min(cap, max(floor, math.ceil(epochs * n_images / spec.batch_size))))
    vae = spec.vae_steps or scaled(VAE_EPOCHS, VAE_FLOOR, VAE_CAP)
    unet = spec.unet_steps or scaled(UNET_EPOCHS, UNET_FLOOR, UNET_CAP)
    return {"vae_steps": vae, "unet_steps": unet, "images": n_images, "distinct_captions": n_captions,
            "vae_rule": "given" if spec.vae_steps else "scaled", "unet_rule": "given" if spec.unet_steps else "scaled"}


def captions_digest(captions: list[str]) -> str:
    """sha256 of the captions (the dataset fingerprint covers images and attributes, not the text)."""
    return hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()


def build_pipeline_run(spec: BuildPipelineSpec, *, progress: bool = True) -> Path:
    """Build, pretrain and save the pipeline at `spec.out` (or reuse an identical finished build there)."""
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the pipeline")
    dataset = open_dataset(dataset_source(spec.data, n=spec.n, size=spec.size, seed=spec.data_seed))
    captions = dataset_captions(dataset)
    dataset_info = {**dataset.info(), "captions_sha256": captions_digest(captions)}
    if _cached_build(out, spec, dataset_info):
        return out
    check_can_write(out)  # before minutes of pretraining
    start = time.perf_counter()
    schedule = training_schedule(spec, len(captions), len(set(captions)))
    components = build_components(captions, image_size=dataset.size, channels=dataset.channels, seed=spec.seed,
                                  model_size=spec.model_size)
    log = pretrain(components, dataset.images, captions, vae_steps=schedule["vae_steps"],
                   unet_steps=schedule["unet_steps"], batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                   progress=progress)
    if (out / MANIFEST).exists():  # an older build is being replaced: it is unfinished until the new manifest
        (out / MANIFEST).unlink()
    save_pipeline(components, out)
    log["wall_seconds"] = round(time.perf_counter() - start, 2)
    fidelity = _check_captions(out, dataset.images, captions, spec, schedule, progress)
    log["torch_threads"] = torch.get_num_threads()
    write_json_atomic(out / MANIFEST, {"format": FORMAT, "spec": spec.to_dict(), "command": command_line(),
                                       "dataset": dataset_info, "schedule": schedule, "log": log,
                                       "caption_fidelity": fidelity, "versions": versions()})
    return out


def _check_captions(out: Path, images, captions: list[str], spec: BuildPipelineSpec, schedule: dict,
                    progress: bool) -> dict | None:
    """`check-captions` on the folder just saved (None when --check-captions 0)."""
    if not spec.check_captions:
        return None
    adapter = adapter_of(out)
    start = time.perf_counter()
    result = fidelity_of(adapter, adapter.load(out), images, captions,
                         CheckCaptionsSpec(checkpoint=str(out), captions=spec.check_captions, seed=spec.seed),
                         hint=f"train longer: --unet-steps {2 * schedule['unet_steps']}", progress=progress)
    return {**result, "seconds": round(time.perf_counter() - start, 2)}


def _cached_build(out: Path, spec: BuildPipelineSpec, dataset_info: dict) -> bool:
    """True when `out` holds a finished build of the same settings (wherever `out` was spelled), data and captions."""
    return finished_build(out, FORMAT, "model_index.json", spec, dataset_info, ("fingerprint", "captions_sha256"))
