"""The import-lora stage: UNet LoRA weights trained elsewhere (e.g. by diffusers' text-to-image LoRA script),
with the base pipeline they were trained on, as a fine-tune folder every other stage takes as --checkpoint.

    gradtrace import-lora --base SD_FOLDER --lora LORA_FOLDER_OR_FILE --out runs/my-lora

The weights (peft's lora_A/lora_B keys or the scripts' lora.down/lora.up) are checked against the base UNet
(modules and shapes) and written as `pytorch_lora_weights.safetensors` beside a manifest naming the base and its
fingerprint; the rank and the target modules are read off the weights, alpha defaults to the rank (the
scripts' setting). The folder records no training data: pass --data to featurize its training images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradtrace.adapters import get_adapter
from gradtrace.errors import UserError
from gradtrace.io import command_line
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


def import_lora_run(spec: ImportLoraSpec, *, progress: bool = True) -> Path:
    return get_adapter("diffusers").import_lora(spec.base, spec.lora, spec.out, alpha=spec.alpha,
                                                extra={"command": command_line(), "spec": spec.to_dict()})
