"""The tiny diffusers UNets gradtrace trains itself, as a model adapter (`diffusion-unet`).

Models: `DiffusionModel` (a diffusers `UNet2DModel`, or a `UNet2DConditionModel` conditioned on one token per
attribute), trained with DDPM ε-prediction (`train.py`), sampled with DDIM/DDPM (`sample.py`). Examples are
images in [-1, 1] with attribute codes as conditioning; measurements are `loss`, `dtrak` and `mean` over T
timesteps (`measure.py`); the `block` group preset follows the diffusers structure (`groups.py`); the LDS
output is the query's loss on a fixed grid of timesteps × noise draws (`outputs.py`).
"""
from __future__ import annotations

import numpy as np

from gradtrace.adapters.base import Checkpoint, ModelAdapter, OutputGrid
from gradtrace.adapters.checkpoint import load_checkpoint
from gradtrace.adapters.diffusion.aspects import query_codes
from gradtrace.adapters.diffusion.configs import MODEL_CHOICES, default_model_config
from gradtrace.adapters.diffusion.groups import PRESETS, block_key
from gradtrace.adapters.diffusion.measure import MEASUREMENTS, DiffusionObjective
from gradtrace.adapters.diffusion.outputs import GridLosses
from gradtrace.adapters.diffusion.sample import sample
from gradtrace.adapters.diffusion.train import TrainConfig, train
from gradtrace.adapters.diffusion.unet import build_model, make_scheduler
from gradtrace.data.sources import Examples, load_source, require_images
from gradtrace.errors import UserError

# The preferred model kind per dataset when the kind is "auto": digits are the unconditional benchmark.
AUTO_MODEL = {"digits": "unconditional"}


class TinyUNetAdapter(ModelAdapter):
    name = "diffusion-unet"
    measurements = MEASUREMENTS
    group_presets = PRESETS
    model_kinds = MODEL_CHOICES
    output_name = "diffusion loss"
    output_is_loss = True

    def __init__(self):
        self._losses = GridLosses()

    # ------------------------------------------------------------------ checkpoints
    def build(self, model_config: dict, seed: int = 0):
        return build_model(model_config, seed=seed)

    def load(self, path) -> Checkpoint:
        ckpt = load_checkpoint(path, build_model)
        ckpt.extras["scheduler"] = make_scheduler(ckpt.model.config)
        return ckpt

    # ------------------------------------------------------------------ groups and measurements
    def group_key(self, preset: str):
        return block_key if preset == "block" else None

    def objective(self, checkpoint: Checkpoint, measurement: str, repeats: int, seed: int) -> DiffusionObjective:
        return DiffusionObjective.create(checkpoint.extras["scheduler"], measurement, repeats, seed)

    # ------------------------------------------------------------------ data
    def examples(self, model_config: dict, source: dict, ids=None, cache_dir=None) -> Examples:
        values = model_config.get("attributes") or None if model_config.get("kind") == "conditional" else None
        ex = load_source(source, attribute_values=values, ids=ids)
        want = (int(model_config["channels"]), int(model_config["size"]), int(model_config["size"]))
        if tuple(ex.images.shape[1:]) != want:
            raise UserError(f"images have shape {tuple(ex.images.shape[1:])} but the model takes {want}; "
                            f"pass matching data or --size")
        return ex

    # ------------------------------------------------------------------ training
    def default_model_config(self, dataset, kind: str = "auto", base=None, lora_rank=None, model_options=None) -> dict:
        if model_options is not None:
            raise UserError("--model-options sets a classifier's architecture (--adapter classifier); the tiny UNets "
                            "take --model and --size (drop --model-options)")
        if base is not None or lora_rank is not None:
            raise UserError("the diffusion-unet adapter trains tiny UNets from scratch; --base and --lora-rank "
                            "fine-tune a diffusers pipeline (drop --adapter)")
        require_images(dataset, "the tiny diffusion UNets")
        if kind == "auto":
            kind = AUTO_MODEL.get(dataset.name, "conditional" if dataset.attributes else "unconditional")
        if kind == "conditional" and not dataset.attributes:
            raise UserError(f"dataset '{dataset.name}' has no attributes to condition on; use --model "
                            f"unconditional or add attribute columns to metadata.jsonl")
        return default_model_config(kind, channels=dataset.channels, size=dataset.size,
                                    attributes=dataset.attributes if kind == "conditional" else None)

    def train_config(self, values: dict | None) -> TrainConfig:
        return TrainConfig.from_dict(values)

    def train(self, model_config: dict, dataset, train_config, ids=None, progress: bool = True, resume=None):
        return train(model_config, dataset, train_config, ids=ids, progress=progress, resume=resume)

    # ------------------------------------------------------------------ evaluation and queries
    def outputs(self, checkpoint: Checkpoint, examples: Examples, grid: OutputGrid) -> np.ndarray:
        """Each query's diffusion loss on the grid; the grid's noise is drawn once for a query set."""
        return self._losses(checkpoint.model, checkpoint.extras["scheduler"], examples.images, examples.ids,
                            examples.cond, grid)

    def attributes(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        return checkpoint.model.attribute_values if checkpoint.model.conditional else {}

    def sample(self, checkpoint: Checkpoint, num: int, *, prompts=None, **options):
        """(images, codes) from `sample` with the checkpoint's model and scheduler."""
        if prompts:
            raise UserError("this model is conditioned on attribute tokens, not text; use --attr NAME=VALUE")
        if next(checkpoint.model.parameters()).device.type != "cpu":
            raise UserError("the tiny UNets sample on the CPU; use --device cpu")
        if options.get("attributes") is not None and not checkpoint.model.conditional:
            raise UserError("this checkpoint is unconditional; drop --attr or train with --model conditional")
        return sample(checkpoint.model, checkpoint.extras["scheduler"], num, **options)

    def query_request(self, checkpoint: Checkpoint, num: int, *, aspect: str | None, seed: int,
                      prompts: list[str] | None = None) -> dict:
        """Conditioning codes of `num` generated queries: only `aspect`'s token set, or all set."""
        if prompts:
            raise UserError("this model is conditioned on attribute tokens, not text; drop --prompts")
        model = checkpoint.model
        if aspect is None and not model.conditional:
            return {}
        return {"codes": query_codes(model.attribute_values, num, aspect=aspect, seed=seed)}
