"""In-memory models and data sets written in the layout the adapters and the data layer read, so the Python front
door (`gradtrace.pipeline.tracer`) runs the same stages as the command line.

- a diffusers text-to-image pipeline → `save_pretrained(STORE/base)` with its UNet's LoRA layers left out, and a
  UNet LoRA saved as diffusers saves it (`save_lora_weights`) and imported as `gradtrace import-lora` does;
- a transformers causal LM (`PreTrainedModel`) → `model.save_pretrained(dir)` + `tokenizer.save_pretrained(dir)`,
  the folder the `causal-lm` adapter loads; a peft LoRA causal LM (`get_peft_model`, `PeftModel.from_pretrained`)
  → its base without the LoRA layers and the tokenizer into `STORE/base`, and the adapter (`save_pretrained`)
  into the checkpoint folder, its adapter_config.json naming that base: the peft adapter folder the CLI takes;
- any other `nn.Module` → a `classifier` checkpoint (safetensors + manifest) whose model config names the
  function that rebuilds it (`factory`, default: the module's own class, with `kwargs`);
- a `datasets.Dataset`, a list of texts, of PIL images or of (PIL image, label) pairs → `save_to_disk(dir)`,
  read back as `hf:dir`.

`object_fingerprint(model)` is over the in-memory parameters (names, dtypes, shapes, bytes; of each module of a
pipeline): the front door
records it beside what it wrote and refuses other weights in the same store.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from safetensors.torch import save
from torch import nn

from gradtrace.adapters import get_adapter
from gradtrace.adapters.causal_lm.folder import quiet_transformers
from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.errors import UserError
from gradtrace.extras import require
from gradtrace.io import write_bytes_atomic

LORA_PARTS = ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B.", "lora_magnitude_vector.")
SUPPORTED = ("a diffusers text-to-image pipeline (its UNet LoRA included), a transformers causal LM "
             "(AutoModelForCausalLM, peft LoRA or not) with its tokenizer, a torch nn.Module image classifier, or a "
             "checkpoint folder")


def model_kind(model) -> str:
    """The adapter name of an in-memory model ("diffusers", "causal-lm" or "classifier"); anything else is
    refused."""
    if type(model).__module__.startswith("diffusers.") and hasattr(model, "components") and \
            hasattr(model, "save_pretrained"):
        return "diffusers"
    if isinstance(model, nn.Module) and hasattr(model, "save_pretrained") and \
            getattr(getattr(model, "config", None), "model_type", None):
        if hasattr(model, "peft_config") and not _is_peft_model(model):
            raise UserError("a transformers model with adapters added by add_adapter is not taken in memory; wrap "
                            "it with peft.get_peft_model (or PeftModel.from_pretrained), or fuse the adapter")
        return "causal-lm"
    if isinstance(model, nn.Module) and not hasattr(model, "save_pretrained"):
        return "classifier"
    raise UserError(f"gradtrace cannot attribute a {type(model).__module__}.{type(model).__name__}; pass {SUPPORTED}")


def object_fingerprint(model) -> str:
    """Over the parameters of the model, or of every module of a pipeline (named by component)."""
    if isinstance(model, nn.Module):
        return model_fingerprint(model)
    parts = sorted((name, part) for name, part in model.components.items() if isinstance(part, nn.Module))
    return hashlib.sha256("".join(f"{name}:{model_fingerprint(part)}\n" for name, part in parts).encode()).hexdigest()


def write_pipeline(pipe, base: Path, lora: Path, folder: Path) -> Path:
    """A diffusers pipeline: `save_pretrained` into `base` (its UNet without LoRA layers); with a UNet LoRA, the
    LoRA weights as diffusers saves them into `lora` and a gradtrace fine-tune of the base into `folder` (the
    `import-lora` stage's); returns the checkpoint folder (`base` without a LoRA)."""
    unet = pipe.unet
    te = getattr(pipe, "text_encoder", None)
    if getattr(te, "peft_config", None):
        raise UserError("text-encoder LoRA is not attributed; fuse it into the text encoder first")
    adapters = dict(getattr(unet, "peft_config", None) or {})
    if len(adapters) > 1:
        raise UserError(f"the UNet holds {len(adapters)} LoRA adapters ({', '.join(adapters)}); keep one "
                        "(unet.delete_adapters) or fuse the others")
    part = _fresh(base.with_name(base.name + ".partial"))
    pipe.save_pretrained(part, safe_serialization=True)
    if adapters:
        state = {k.replace(".base_layer.", "."): v.detach().cpu().contiguous() for k, v in unet.state_dict().items()
                 if ".lora_" not in k}
        weights = next((part / "unet").glob("*.safetensors"))
        write_bytes_atomic(weights, save(state, metadata={"format": "pt"}))
    _move(part, base)
    if not adapters:
        return base
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    name, config = next(iter(adapters.items()))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))
    part = _fresh(lora.with_name(lora.name + ".partial"))
    type(pipe).save_lora_weights(save_directory=part, unet_lora_layers=layers, safe_serialization=True)
    _move(part, lora)
    part = _fresh(folder.with_name(folder.name + ".partial"))
    get_adapter("diffusers").import_lora(base, lora, part, alpha=float(config.lora_alpha))
    return _move(part, folder)


def write_lm(model, tokenizer, folder: Path, state_dict: dict | None = None) -> Path:
    """`save_pretrained` of the model (or of `state_dict` in its layout) and its tokenizer into `folder` (written
    beside, then moved in place)."""
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise UserError("a causal LM needs its tokenizer: Tracer(model, tokenizer=tokenizer, ...)")
    quiet_transformers()
    part = _fresh(folder.with_name(folder.name + ".partial"))
    model.save_pretrained(part, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(part)
    return _move(part, folder)


def write_peft_lm(model, tokenizer, base: Path, folder: Path) -> Path:
    """A peft LoRA causal LM: its base LM (LoRA layers left out) and the tokenizer saved into `base`, the adapter
    with peft's `save_pretrained` into `folder`, whose adapter_config.json names `base`; returns `folder`."""
    import json

    adapters = dict(model.peft_config)
    if len(adapters) != 1:
        raise UserError(f"the model holds {len(adapters)} peft adapters ({', '.join(adapters)}); keep one "
                        "(model.delete_adapter) or merge the others")
    name, config = next(iter(adapters.items()))
    if str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
        raise UserError(f"the model holds a {config.peft_type} adapter; gradtrace attributes LoRA adapters")
    lm = model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in lm.state_dict().items()
             if not any(f".{part}" in k for part in LORA_PARTS)}
    write_lm(lm, tokenizer, base, state_dict=state)
    quiet_transformers()
    part = _fresh(folder.with_name(folder.name + ".partial"))
    model.save_pretrained(part, selected_adapters=[name], safe_serialization=True)
    saved = part / name if name != "default" else part  # peft saves other adapter names in a sub-folder
    config_file = saved / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = str(base.resolve())
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    done = _move(saved, folder)
    if part.exists():
        shutil.rmtree(part)
    return done


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def classifier_config(model: nn.Module, dataset, factory=None, kwargs: dict | None = None) -> dict:
    """The classifier model config of `model` for `dataset` (its image size, channels and label): the module's own
    config when gradtrace built it, else a `factory` config naming the function that rebuilds it."""
    adapter = get_adapter("classifier")
    own = getattr(model, "config", None)
    if isinstance(own, dict) and own.get("arch"):
        return own
    if factory is None:
        factory = type(model)
    if callable(factory):
        factory = f"{factory.__module__}:{factory.__qualname__}"
    return adapter.default_model_config(dataset, "factory",
                                        model_options={"factory": str(factory), "kwargs": dict(kwargs or {})})


def write_classifier(model: nn.Module, config: dict, folder: Path) -> Path:
    """A classifier checkpoint of `model`'s weights: rebuilt from `config`, the weights loaded, saved (the user's
    module is not changed)."""
    adapter = get_adapter("classifier")
    rebuilt = adapter.build(config)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"{config.get('factory', config['arch'])} with kwargs {config.get('kwargs', {})} does not "
                        f"rebuild this model ({first}); pass factory= and kwargs= that construct it") from None
    part = _fresh(folder.with_name(folder.name + ".partial"))
    adapter.save(part, rebuilt, train_config={}, dataset_info=None)
    return _move(part, folder)


def as_hf_dataset(data):
    """A `datasets.Dataset` of `data`: itself, or built from a list of texts, PIL images or (image, label) pairs."""
    datasets = require("datasets", "in-memory data")  # the `hf` extra
    if isinstance(data, datasets.Dataset):
        return data
    rows = list(data) if isinstance(data, (list, tuple)) else None
    if not rows:
        raise UserError(f"cannot read examples from a {type(data).__name__}; pass a datasets.Dataset or a non-empty "
                        "list of texts, PIL images or (image, label) pairs")
    from PIL import Image

    first = rows[0]
    if all(isinstance(r, str) for r in rows):
        return datasets.Dataset.from_dict({"text": rows})
    if all(isinstance(r, Image.Image) for r in rows):
        return datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    if isinstance(first, (tuple, list)) and all(len(r) == 2 and isinstance(r[0], Image.Image) for r in rows):
        labels = [r[1] for r in rows]
        label_type = "string" if isinstance(labels[0], str) else "int64"
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value(label_type)})
        return datasets.Dataset.from_dict({"image": [r[0] for r in rows], "label": labels}, features=features)
    raise UserError(f"cannot read examples from a list of {type(first).__name__}; pass texts, PIL images or "
                    "(PIL image, label) pairs, or a datasets.Dataset")


def write_dataset(ds, folder: Path, progress: bool = True) -> Path:
    """`ds.save_to_disk` into `folder` (written beside, then moved in place)."""
    from datasets.utils import logging as bars

    part = _fresh(folder.with_name(folder.name + ".partial"))
    was_off = not bars.is_progress_bar_enabled()
    if not progress:
        bars.disable_progress_bar()
    try:
        ds.save_to_disk(str(part))
    finally:
        if not progress and not was_off:
            bars.enable_progress_bar()
    return _move(part, folder)


def dataset_fingerprint(ds) -> str:
    """The `datasets` fingerprint of a dataset (changes with its content and every transform applied)."""
    return str(getattr(ds, "_fingerprint", None) or ds.fingerprint)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _move(part: Path, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    part.rename(folder)
    return folder
