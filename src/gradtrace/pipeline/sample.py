"""The sample stage: generate query images from a checkpoint (generative adapters only)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradtrace.adapters import adapter_of
from gradtrace.data.sources import SAMPLE_CAUSE, save_samples
from gradtrace.errors import UserError
from gradtrace.io import check_finite, command_line, read_json, sha256_arrays
from gradtrace.pipeline.devices import device_option, dtype_option, resolve_device
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.precision import autocast
from gradtrace.report.grids import image_grid

SAMPLERS = ("ddim", "ddpm")
DEFAULT_NUM = 16


def read_prompts(path) -> list[str]:
    """The non-empty lines of a prompt file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}; write one prompt per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"prompt file {path} is empty; write one prompt per line")
    return lines


def parse_attrs(pairs: list[str]) -> dict[str, str]:
    """["name=value", ...] → {name: value}."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--attr '{pair}' is not NAME=VALUE; write e.g. --attr style=stripes")
        name, value = pair.split("=", 1)
        out[name.strip()] = value.strip()
    return out


@dataclass
class SampleSpec(Spec):
    checkpoint: str = option(None, "checkpoint directory", required=True)
    out: str = option(None, "samples directory", required=True)
    num: int | None = option(None, "number of images (default: 16, or one per line of --prompts)", type=int,
                             check=positive)
    attr: list = option([], "set one attribute token (repeatable); unset attributes use the null token",
                        append=True, metavar="NAME=VALUE")
    codes: object = option(None, "conditioning codes per image (num, A), from Python", cli=False)
    texts: list | None = option(None, "the prompt of each image, from Python", cli=False)
    prompt: str | None = option(None, "text-to-image models: the prompt of every image", type=str)
    prompts: str | None = option(None, "text-to-image models: a file with one prompt per line (one image each)",
                                 type=str)
    guidance: float = option(1.0, "classifier-free guidance scale (1 = off)")
    sampler: str = option("ddim", "sampler", choices=SAMPLERS)
    sample_steps: int = option(50, "sampling steps", check=positive)
    eta: float = option(1.0, "DDIM noise level in [0, 1] (0 = deterministic DDIM)")
    seed: int = option(0, "sampling seed")
    device: str = device_option()
    dtype: str = dtype_option()

    def validate(self) -> None:
        parse_attrs(self.attr)
        if self.prompt is not None and self.prompts is not None:
            raise UserError("pass either --prompt TEXT or --prompts FILE, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise UserError("--prompt is empty; write the text the images should show")

    def prompt_list(self) -> list[str] | None:
        """The prompt of each image (None: the model is not prompted)."""
        if self.texts is not None:
            return [str(t) for t in self.texts]
        if self.prompts is not None:
            lines = read_prompts(self.prompts)
            path = self.prompts
            if self.num is not None and self.num != len(lines):
                raise UserError(f"--num {self.num} but {path} has {len(lines)} prompts; drop --num (one image per "
                                "prompt)")
            return lines
        if self.prompt is not None:
            return [self.prompt.strip()] * self.count()
        return None

    def count(self) -> int:
        return DEFAULT_NUM if self.num is None else self.num


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
