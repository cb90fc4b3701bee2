"""The import-lora stage's spec: a LoRA trained elsewhere, its base, and where the checkpoint goes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option


def _positive_or_none(value, flag: str) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{flag} must be a positive number, got {value}")


@dataclass
class ImportLoraSpec(Spec):
    base: str = option(None, "the text-to-image pipeline folder the LoRA weights were trained on", required=True)
    lora: str = option(None, "the folder holding pytorch_lora_weights.safetensors, or a .safetensors file",
                       required=True)
    out: str = option(None, "fine-tune folder to write", required=True)
    alpha: float | None = option(None, "LoRA alpha (default: the rank, as diffusers' training scripts set it)",
                                 type=float, check=_positive_or_none)

    def validate(self) -> None:
        if Path(self.out).exists() and any(Path(self.out).iterdir()):
            raise UserError(f"{self.out} exists and is not empty; choose a new --out folder")
