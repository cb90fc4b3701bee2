"""Model adapters by name: the one place that maps a checkpoint to the code that knows its kind of model.

    adapter = get_adapter("diffusion-unet")          # a built-in adapter (also "diffusers", "classifier", "causal-lm")
    adapter = get_adapter("mypkg.adapters:MyAdapter")  # any ModelAdapter subclass by import path
    adapter = adapter_of(checkpoint_dir)             # the adapter named in a checkpoint's manifest

Adapters are imported on first use, so nothing model-specific loads until a stage asks for it. See
`gradtrace.adapters.base` for the interface, `gradtrace.adapters.layers` for the layer-type facts the featurizers
share, and docs/architecture.md for how to write one.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from gradtrace.adapters.base import DEFAULT_ADAPTER, Checkpoint, ContextStage, ModelAdapter, Objective
from gradtrace.errors import UserError
from gradtrace.extras import missing_extra
from gradtrace.io import read_json

BUILTIN = {"diffusion-unet": "gradtrace.adapters.diffusion.adapter:TinyUNetAdapter",
           "diffusers": "gradtrace.adapters.diffusers.adapter:DiffusersAdapter",
           "classifier": "gradtrace.adapters.classifier.adapter:ClassifierAdapter",
           "causal-lm": "gradtrace.adapters.causal_lm.adapter:CausalLMAdapter"}
PIPELINE_ADAPTER = "diffusers"  # a folder saved by diffusers' save_pretrained (model_index.json)
LM_ADAPTER = "causal-lm"  # a folder saved by transformers' save_pretrained (config.json with a model_type), or peft's
_CACHE: dict[str, ModelAdapter] = {}

__all__ = ["BUILTIN", "Checkpoint", "ContextStage", "DEFAULT_ADAPTER", "ModelAdapter", "Objective", "adapter_of",
           "get_adapter"]


def get_adapter(name: str = DEFAULT_ADAPTER) -> ModelAdapter:
    """The adapter called `name`: a built-in one, or "module:Class" naming a ModelAdapter subclass."""
    if name not in _CACHE:
        target = BUILTIN.get(name, name)
        if ":" not in target:
            raise UserError(f"unknown model adapter '{name}'; use one of {', '.join(BUILTIN)} or module:Class")
        module, cls = target.split(":", 1)
        try:
            adapter_cls = getattr(import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            missing = missing_extra(exc, f"the '{name}' model adapter")  # its optional package: the extra's line
            if missing is not None:
                raise missing from None
            raise UserError(f"cannot import model adapter '{name}' ({exc}); install it or fix the name")
        if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, ModelAdapter)):
            raise UserError(f"'{name}' is not a gradtrace ModelAdapter subclass")
        _CACHE[name] = adapter_cls()
    return _CACHE[name]


def adapter_of(checkpoint) -> ModelAdapter:
    """The adapter of a checkpoint directory: named in its manifest (config.json), or `diffusers` for a
    pipeline folder (model_index.json) or a UNet2DModel folder with its scheduler_config.json, `causal-lm` for a
    transformers model folder (config.json with a model_type) or a peft adapter folder (adapter_config.json)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}; train a model first or fix the path")
    if (path / "model_index.json").is_file():
        return get_adapter(PIPELINE_ADAPTER)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
        return get_adapter(LM_ADAPTER)
    if not (path / "config.json").exists():
        raise UserError(f"not a checkpoint (no config.json, the save did not finish): {path}; re-run training")
    config = read_json(path / "config.json", "checkpoint config")
    if isinstance(config, dict) and "_class_name" in config:  # a diffusers model folder
        if config["_class_name"] == "UNet2DModel" and (path / "scheduler_config.json").is_file():
            return get_adapter(PIPELINE_ADAPTER)
        raise UserError(f"{path} holds a diffusers {config['_class_name']} alone; pass the pipeline folder that "
                        "contains it (the one with model_index.json)")
    if isinstance(config, dict) and "model_type" in config and "format" not in config:  # a transformers model
        return get_adapter(LM_ADAPTER)
    name = config.get("adapter", DEFAULT_ADAPTER) if isinstance(config, dict) else DEFAULT_ADAPTER
    return get_adapter(name)
