"""The build-pipeline stage's spec: the small text-to-image pipeline to build and pretrain."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, non_negative, option, positive, positive_number

MODEL_SIZES = ("small", "medium")  # gradtrace.adapters.diffusers.build.UNET_SIZES (kept here: specs import no torch)


@dataclass
class BuildPipelineSpec(Spec):
    data: str = option("shapes", "captioned dataset: shapes | imagefolder:PATH (captions: a \"text\" column)")
    out: str = option(None, "pipeline directory to write", required=True)
    n: int | None = option(None, "use the first N images of the dataset", type=int, check=positive)
    size: int = option(16, "image size, a multiple of 4 (8 for --model-size medium; latents are half of it)",
                       check=positive)
    data_seed: int = option(0, "seed of a generated dataset (shapes)")
    model_size: str = option("small", "UNet size: small (2 levels, 32-64 channels, 1.0M parameters) | medium "
                             "(3 levels, 32-128 channels, 2 layers per block, 6.0M)",
                             choices=MODEL_SIZES)
    vae_steps: int | None = option(None, "VAE training steps (default: scaled to the data, see the README)",
                                   type=int, check=positive)
    unet_steps: int | None = option(None, "UNet + text encoder training steps (default: scaled to the data and "
                                    "its distinct captions, see the README)", type=int, check=positive)
    batch_size: int = option(32, "images per step", check=positive)
    lr: float = option(1e-3, "learning rate (AdamW, both phases)", check=positive_number)
    seed: int = option(0, "seed of the initial weights and of every training draw")
    check_captions: int = option(32, "after training, check how well the pipeline renders up to this many distinct "
                                 "training captions (0: skip; see `gradtrace check-captions`)", check=non_negative)

    def validate(self) -> None:
        factor = 8 if self.model_size == "medium" else 4
        if self.size % factor:
            raise UserError(f"--size must be a multiple of {factor} for --model-size {self.model_size} (the VAE and "
                            f"each UNet level halve it), got {self.size}")
