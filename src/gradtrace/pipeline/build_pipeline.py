"""The build-pipeline stage: a small text-to-image pipeline in the Stable Diffusion layout, made from configs and
pretrained on a captioned dataset on CPU (or reused, when `out` already holds an identical build).

    build_pipeline_run(BuildPipelineSpec(out="runs/sd-shapes"))   # 3.5 min on 2 CPU cores (4.8 on one thread)

The folder is written by `StableDiffusionPipeline.save_pretrained` (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/), so whatever reads Stable Diffusion 1.x/2.x folders reads it too; the
tokenizer folder also holds CLIP's vocab.json and merges.txt. `gradtrace_build.json` beside them records the
spec, the command, the dataset, the losses and the versions; it is written last, so it marks a finished build.
Captions are the "text" entry of each image's metadata (shapes has them; an imagefolder gets them from a
"text" column of its metadata.jsonl).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from gradtrace.adapters.diffusers.build import build_components, save_pipeline
from gradtrace.adapters.diffusers.pretrain import pretrain
from gradtrace.data.sources import dataset_source, open_dataset
from gradtrace.errors import UserError
from gradtrace.io import check_can_write, command_line, versions, write_json_atomic
from gradtrace.pipeline.build_manifest import MANIFEST, finished_build
from gradtrace.pipeline.specs.build_pipeline import BuildPipelineSpec

FORMAT = "gradtrace-built-pipeline"


def dataset_captions(dataset) -> list[str]:
    """Each image's "text" caption; refused when an image has none."""
    missing = [int(i) for i, meta in zip(dataset.ids, dataset.metadata)
               if not isinstance(meta.get("text"), str) or not meta["text"].strip()]
    if missing:
        raise UserError(f"dataset '{dataset.name}' has no \"text\" caption for {len(missing)} of {len(dataset)} "
                        f"images (first id {missing[0]}); use a captioned dataset: shapes, or imagefolder:PATH "
                        "whose metadata.jsonl gives every image a \"text\"")
    return [meta["text"] for meta in dataset.metadata]


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
    components = build_components(captions, image_size=dataset.size, channels=dataset.channels, seed=spec.seed)
    log = pretrain(components, dataset.images, captions, vae_steps=spec.vae_steps, unet_steps=spec.unet_steps,
                   batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, progress=progress)
    if (out / MANIFEST).exists():  # an older build is being replaced: it is unfinished until the new manifest
        (out / MANIFEST).unlink()
    save_pipeline(components, out)
    log["wall_seconds"] = round(time.perf_counter() - start, 2)
    log["torch_threads"] = torch.get_num_threads()
    write_json_atomic(out / MANIFEST, {"format": FORMAT, "spec": spec.to_dict(), "command": command_line(),
                                       "dataset": dataset_info, "log": log, "versions": versions()})
    return out


def _cached_build(out: Path, spec: BuildPipelineSpec, dataset_info: dict) -> bool:
    """True when `out` holds a finished build of the same settings (wherever `out` was spelled), data and captions."""
    return finished_build(out, FORMAT, "model_index.json", spec, dataset_info, ("fingerprint", "captions_sha256"))
