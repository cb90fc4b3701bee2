"""The build-pipeline stage's spec: the small text-to-image pipeline to build and pretrain."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive, positive_number


@dataclass
class BuildPipelineSpec(Spec):
    data: str = option("shapes", "captioned dataset: shapes | imagefolder:PATH (captions: a \"text\" column)")
    out: str = option(None, "pipeline directory to write", required=True)
    n: int | None = option(None, "use the first N images of the dataset", type=int, check=positive)
    size: int = option(16, "image size, a multiple of 4 (latents are half of it)", check=positive)
    data_seed: int = option(0, "seed of a generated dataset (shapes)")
    vae_steps: int = option(400, "VAE training steps", check=positive)
    unet_steps: int = option(800, "UNet + text encoder training steps", check=positive)
    batch_size: int = option(32, "images per step", check=positive)
    lr: float = option(1e-3, "learning rate (AdamW, both phases)", check=positive_number)
    seed: int = option(0, "seed of the initial weights and of every training draw")

    def validate(self) -> None:
        if self.size % 4:
            raise UserError(f"--size must be a multiple of 4 (the VAE and the UNet each halve it), got {self.size}")
