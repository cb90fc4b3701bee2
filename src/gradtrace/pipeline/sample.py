"""The sample stage: generate query images from a checkpoint (generative adapters only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradtrace.adapters import adapter_of
from gradtrace.data.sources import SAMPLE_CAUSE, save_samples
from gradtrace.errors import UserError
from gradtrace.io import check_finite, command_line, read_json, sha256_arrays
from gradtrace.pipeline.devices import resolve_device
from gradtrace.pipeline.specs.sample import DEFAULT_NUM, SAMPLERS, SampleSpec, parse_attrs, read_prompts  # noqa: F401
from gradtrace.precision import autocast
from gradtrace.report.grids import image_grid


def sample_run(spec: SampleSpec, *, progress: bool = True) -> Path:
    """Generate `spec.num` images (attributes from `attr`, or per-image `codes`); writes a samples directory."""
    adapter = adapter_of(spec.checkpoint)
    ckpt = adapter.load(spec.checkpoint)
    attrs = parse_attrs(spec.attr)
    vocabulary = adapter.attributes(ckpt)
    request = spec.codes if spec.codes is not None else (attrs or None)
    prompts = spec.prompt_list()
    num = len(prompts) if prompts is not None else (len(spec.codes) if spec.codes is not None else spec.count())
    device = resolve_device(spec.device)
    out = Path(spec.out)
    if _finished_identical(out, spec, ckpt.fingerprint, device):  # e.g. learn-weights --generate after a kill
        return out
    ckpt.model.to(device)
    with autocast(device, spec.dtype):
        images, cond = adapter.sample(ckpt, num, attributes=request, prompts=prompts, guidance_scale=spec.guidance,
                                      steps=spec.sample_steps, sampler=spec.sampler, seed=spec.seed, eta=spec.eta,
                                      progress=progress)
    images = images.to(torch.float32)
    check_finite(images, "sample", SAMPLE_CAUSE)  # before the grid: a refused set writes nothing
    info = {"checkpoint": str(Path(spec.checkpoint).resolve()), "model_fingerprint": ckpt.fingerprint,
            "attributes": attrs, "attribute_values": vocabulary,
            "guidance": spec.guidance, "sampler": spec.sampler, "sample_steps": spec.sample_steps, "seed": spec.seed,
            "eta": spec.eta if spec.sampler == "ddim" else None, "prompts": prompts, "command": command_line(),
            "device": str(device), "spec": spec.to_dict()}
    if out.is_dir():  # an earlier set's manifest never describes the new arrays, even if this run is killed
        (out / "manifest.json").unlink(missing_ok=True)
    image_grid(images.numpy(), out / "grid.png")
    save_samples(out, images, cond, info)  # the manifest last: its presence marks a finished samples directory
    return out


def _finished_identical(out: Path, spec: SampleSpec, fingerprint: str, device) -> bool:
    """True when `out` holds a finished samples folder of the same settings from the same model on the same kind
    of device, its images as they were written: sampling again would give the same bytes, so it is reused."""
    try:
        old = read_json(out / "manifest.json", "samples manifest")
        settings = {k: v for k, v in spec.to_dict().items() if k != "out"}
        same = (isinstance(old, dict) and old.get("model_fingerprint") == fingerprint
                and old.get("device") == str(device) and isinstance(old.get("spec"), dict)
                and {k: v for k, v in old["spec"].items() if k != "out"} == settings)
        return same and sha256_arrays([np.load(out / "images.npy")]) == old.get("fingerprint")
    except (UserError, OSError, ValueError):
        return False
