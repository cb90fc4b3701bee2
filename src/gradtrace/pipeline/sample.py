"""The sample stage: generate query images from a checkpoint (generative adapters only)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradtrace.adapters import adapter_of
from gradtrace.data.sources import save_samples
from gradtrace.errors import UserError
from gradtrace.io import command_line
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.report.grids import image_grid

SAMPLERS = ("ddim", "ddpm")


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
    num: int = option(16, "number of images", check=positive)
    attr: list = option([], "set one attribute token (repeatable); unset attributes use the null token",
                        append=True, metavar="NAME=VALUE")
    codes: object = option(None, "conditioning codes per image (num, A), from Python", cli=False)
    guidance: float = option(1.0, "classifier-free guidance scale (1 = off)")
    sampler: str = option("ddim", "sampler", choices=SAMPLERS)
    sample_steps: int = option(50, "sampling steps", check=positive)
    eta: float = option(1.0, "DDIM noise level in [0, 1] (0 = deterministic DDIM)")
    seed: int = option(0, "sampling seed")

    def validate(self) -> None:
        parse_attrs(self.attr)


def sample_run(spec: SampleSpec, *, progress: bool = True) -> Path:
    """Generate `spec.num` images (attributes from `attr`, or per-image `codes`); writes a samples directory."""
    adapter = adapter_of(spec.checkpoint)
    ckpt = adapter.load(spec.checkpoint)
    attrs = parse_attrs(spec.attr)
    vocabulary = adapter.attributes(ckpt)
    if attrs and not vocabulary:
        raise UserError("this checkpoint is unconditional; drop --attr or train with --model conditional")
    request = spec.codes if spec.codes is not None else (attrs or None)
    images, cond = adapter.sample(ckpt, spec.num, attributes=request, guidance_scale=spec.guidance,
                                  steps=spec.sample_steps, sampler=spec.sampler, seed=spec.seed, eta=spec.eta,
                                  progress=progress)
    info = {"checkpoint": str(Path(spec.checkpoint).resolve()), "model_fingerprint": ckpt.fingerprint,
            "attributes": attrs, "attribute_values": vocabulary,
            "guidance": spec.guidance, "sampler": spec.sampler, "sample_steps": spec.sample_steps, "seed": spec.seed,
            "eta": spec.eta if spec.sampler == "ddim" else None, "command": command_line(), "spec": spec.to_dict()}
    save_samples(spec.out, images, cond, info)
    image_grid(images.numpy(), Path(spec.out) / "grid.png")
    return Path(spec.out)
