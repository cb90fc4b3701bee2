"""The import-lora stage: UNet LoRA weights trained elsewhere (e.g. by diffusers' text-to-image LoRA script),
with the base pipeline they were trained on, as a fine-tune folder every other stage takes as --checkpoint.

    gradtrace import-lora --base SD_FOLDER --lora LORA_FOLDER_OR_FILE --out runs/my-lora

The weights (peft's lora_A/lora_B keys or the scripts' lora.down/lora.up) are checked against the base UNet
(modules and shapes) and written as `pytorch_lora_weights.safetensors` beside a manifest naming the base and its
fingerprint; the rank and the target modules are read off the weights, alpha defaults to the rank (the
scripts' setting). The folder records no training data: pass --data to featurize its training images.
"""
from __future__ import annotations

from pathlib import Path

from gradtrace.adapters import get_adapter
from gradtrace.io import command_line
from gradtrace.pipeline.specs.import_lora import ImportLoraSpec


def import_lora_run(spec: ImportLoraSpec, *, progress: bool = True) -> Path:
    return get_adapter("diffusers").import_lora(spec.base, spec.lora, spec.out, alpha=spec.alpha,
                                                extra={"command": command_line(), "spec": spec.to_dict()})
