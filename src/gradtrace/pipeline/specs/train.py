"""The train stage's spec: the data, the kind of model, the recipe's overrides."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gradtrace.choices import DEFAULT_ADAPTER
from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.specs.devices import device_option, dtype_option


@dataclass
class TrainSpec(Spec):
    data: str = option(None, "digits | shapes | imagefolder:PATH | hf:PATH (a Hugging Face dataset saved to disk, "
                       "or parquet; ?image=COL&text=COL&label=COL&split=NAME); text: jsonl:PATH | textfolder:PATH | "
                       "fortunes",
                       required=True)
    out: str = option(None, "checkpoint directory", required=True)
    n: int | None = option(None, "use the first N images of the dataset", type=int, check=positive)
    size: int | None = option(None, "image size (shapes, imagefolder)", type=int, check=positive)
    data_seed: int = option(0, "seed of a generated dataset (shapes)")
    ids: object = option(None, "file of example ids to use (.npy, .json or one per line)", type=str)
    adapter: str | None = option(None, "kind of model: a built-in adapter or module:Class (default: diffusers "
                                 "with --base, else diffusion-unet)", type=str)
    base: str | None = option(None, "fine-tune this diffusers pipeline folder (with --lora-rank: LoRA adapters on "
                              "the UNet's attention), or this transformers causal-LM folder (all of it, or LoRA "
                              "adapters with --lora-rank) on text", type=str)
    lora_rank: int | None = option(None, "rank of the LoRA adapters (with --base)", type=int, check=positive)
    model: str = option("auto", "model kind of the adapter; auto: conditional when the dataset has attributes "
                        "(digits: unconditional); classifier: resnet (auto), vit or factory")
    model_options: str | None = option(None, "the model's own settings as a JSON object, inline or a .json file "
                                       "(classifier: e.g. '{\"widths\": [16, 32], \"blocks\": [1, 1]}', or "
                                       "'{\"factory\": \"pkg.module:function\", \"kwargs\": {...}}')", type=str)
    steps: int | None = option(None, "training steps (default: the recipe's: 3000 for the tiny UNets)", type=int,
                               check=positive)
    batch_size: int | None = option(None, "examples per step (default: the recipe's: 64 for the tiny UNets)",
                                    type=int, check=positive)
    lr: float | None = option(None, "learning rate (default: the recipe's)", type=float)
    seed: int = option(0, "training seed")
    device: str = device_option()
    dtype: str = dtype_option()
    overwrite: bool = option(False, "replace a checkpoint in --out that was trained with other settings or data")

    def __post_init__(self) -> None:
        if self.adapter is None and self.base is not None and is_lm_base(self.base):
            self.adapter = "causal-lm"
        if self.adapter is None:
            self.adapter = "diffusers" if self.base is not None else DEFAULT_ADAPTER
        super().__post_init__()

    def validate(self) -> None:
        if self.lora_rank is not None and self.base is None:
            raise UserError("--lora-rank fine-tunes a pipeline; pass --base PIPELINE too")
        # what the adapter allows (precisions, devices, model kinds) is checked by `train_run` before anything is
        # read or written: the adapter's module is what a spec must not import


def is_lm_base(path) -> bool:
    """True for a transformers model folder (config.json with a model_type): `--base` then trains a causal LM."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "format" not in config
