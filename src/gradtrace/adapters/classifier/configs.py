"""Model configs of the image classifiers: which architecture, its sizes, and which label it predicts.

Every config holds the data side (`channels`, `size`, `label`: the dataset attribute that is the class, `classes`:
its values in class-index order, `num_classes`) and the architecture side:

    {"arch": "resnet", "widths": [16, 32, 64], "blocks": [1, 1, 1], "norm": "group", "norm_groups": 8}
    {"arch": "vit", "patch_size": 2, "hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
    {"arch": "factory", "factory": "pkg.module:function", "kwargs": {...}}

The label of a dataset: digits → "label", shapes → "subject", an image folder → its "label" column (metadata.jsonl,
or the class sub-folders); `label` in the model options picks another attribute.
"""
from __future__ import annotations

import copy

from gradtrace.errors import UserError

KINDS = ("resnet", "vit", "factory")
NORMS = ("group", "batch")
DATA_KEYS = ("arch", "channels", "size", "label", "classes", "num_classes")
ARCH_DEFAULTS = {
    "resnet": {"widths": [16, 32, 64], "blocks": [1, 1, 1], "norm": "group", "norm_groups": 8},
    "vit": {"patch_size": None, "hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64},
    "factory": {"factory": None, "kwargs": {}},
}
DATASET_LABEL = {"digits": "label", "shapes": "subject"}  # any other dataset: its "label" attribute
LABEL = "label"


def label_of(dataset, attribute: str | None = None) -> tuple[str, list[str]]:
    """(attribute, classes) of the class label of a dataset (see the module docstring)."""
    name = str(getattr(dataset, "name", "?"))
    vocab = dict(dataset.attributes)
    if attribute is not None:
        if attribute not in vocab:
            raise UserError(f"dataset '{name}' has no attribute {attribute!r} to use as the label; choose one of "
                            f"{', '.join(vocab) or 'none'}")
    else:
        attribute = DATASET_LABEL.get(name, LABEL)
        if attribute not in vocab:
            raise UserError(f"dataset '{name}' has no class labels; give the images a 'label' column in "
                            "metadata.jsonl, or put them in class sub-folders (PATH/<class>/<image>), or name "
                            "another column with --model-options '{\"label\": \"COLUMN\"}'")
    classes = [str(v) for v in vocab[attribute]]
    if len(classes) < 2:
        raise UserError(f"the label {attribute!r} of dataset '{name}' has {len(classes)} class; a classifier needs "
                        "at least 2")
    return attribute, classes


def default_patch(size: int) -> int:
    """The largest patch size <= size/4 that divides the image side (16 patches for 8x8 and 16x16 images)."""
    for p in range(max(1, size // 4), 0, -1):
        if size % p == 0:
            return p
    return 1  # pragma: no cover (p = 1 always divides)


def default_model_config(kind: str, *, channels: int, size: int, label: str, classes: list[str],
                         options: dict | None = None) -> dict:
    """The config of a `kind` classifier for images (channels, size, size), `options` overriding its defaults."""
    if kind not in KINDS:
        raise UserError(f"unknown classifier kind {kind!r}; use one of {', '.join(KINDS)}")
    options = dict(options or {})
    options.pop("label", None)  # chosen by the caller (label_of)
    defaults = copy.deepcopy(ARCH_DEFAULTS[kind])
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UserError(f"unknown {kind} setting(s) {unknown} in --model-options; valid: "
                        f"{', '.join(['label', *defaults])}")
    config = {"arch": kind, "channels": int(channels), "size": int(size), "label": str(label),
              "classes": [str(c) for c in classes], "num_classes": len(classes), **defaults, **options}
    if kind == "vit" and config["patch_size"] is None:
        config["patch_size"] = default_patch(int(size))
    check_model_config(config)
    return config


def _ints(config: dict, key: str, *, at_least: int = 1) -> list[int]:
    values = config.get(key)
    if not isinstance(values, list) or not values or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= at_least for v in values):
        raise UserError(f"classifier setting {key!r} must be a non-empty list of integers >= {at_least}, got "
                        f"{values!r}")
    return values


def _int(config: dict, key: str, *, at_least: int = 1) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < at_least:
        raise UserError(f"classifier setting {key!r} must be an integer >= {at_least}, got {value!r}")
    return value


def check_model_config(config) -> None:
    """Refuse a config that cannot build its classifier, naming the setting."""
    if not isinstance(config, dict) or config.get("arch") not in KINDS:
        arch = config.get("arch") if isinstance(config, dict) else config
        raise UserError(f"not a classifier model config (arch {arch!r}); use one of {', '.join(KINDS)}")
    _int(config, "channels")
    size = _int(config, "size")
    classes = config.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or len(set(map(str, classes))) != len(classes):
        raise UserError(f"classifier 'classes' must list at least 2 distinct class names, got {classes!r}")
    if config.get("num_classes") != len(classes) or not isinstance(config.get("label"), str):
        raise UserError("classifier 'num_classes' must equal the number of 'classes' and 'label' must name the "
                        "label attribute; build the config with default_model_config")
    arch = config["arch"]
    if arch == "resnet":
        widths, blocks = _ints(config, "widths"), _ints(config, "blocks")
        if len(widths) != len(blocks):
            raise UserError(f"resnet 'widths' and 'blocks' need one entry per stage, got {len(widths)} and "
                            f"{len(blocks)}")
        if config.get("norm") not in NORMS:
            raise UserError(f"resnet 'norm' must be one of {', '.join(NORMS)}, got {config.get('norm')!r}")
        _int(config, "norm_groups")
    elif arch == "vit":
        patch = _int(config, "patch_size")
        if size % patch:
            raise UserError(f"vit 'patch_size' {patch} does not divide the image size {size}; choose a divisor")
        dim, heads = _int(config, "hidden_dim"), _int(config, "num_heads")
        if dim % heads:
            raise UserError(f"vit 'hidden_dim' {dim} is not divisible by 'num_heads' {heads}; change one of them")
        _int(config, "num_layers")
        _int(config, "mlp_dim")
    else:
        target = config.get("factory")
        if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
            raise UserError(f"factory classifier needs 'factory': \"package.module:function\", got {target!r}")
        if not isinstance(config.get("kwargs"), dict):
            raise UserError(f"factory 'kwargs' must be a JSON object of keyword arguments, got "
                            f"{config.get('kwargs')!r}")
