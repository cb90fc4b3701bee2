"""The `block` group preset of the classifiers: a parameter's group from its torchvision-style name.

- ResNet (torchvision's names): ``stem`` (``conv1``, ``bn1``), one group per residual block ``layer{i}.{j}``
  (its downsample included), ``head`` (``fc``);
- ViT (torchvision's names): ``embed`` (``conv_proj``, ``class_token``, ``encoder.pos_embedding``), per encoder
  layer i ``layer{i}.attn`` (``ln_1`` + ``self_attention``) and ``layer{i}.mlp`` (``ln_2`` + ``mlp``),
  ``final_norm`` (``encoder.ln``), ``head`` (``heads``);
- any other name (a factory model's own layout): its top-level child module (the name's first component).

So a torchvision ResNet or ViT built through the factory kind gets the same groups as the built-in ones.
"""
from __future__ import annotations

import re

PRESETS = ("block",)
_RULES = (
    (re.compile(r"^(conv1|bn1)\."), lambda m: "stem"),
    (re.compile(r"^layer(\d+)\.(\d+)\."), lambda m: f"layer{m.group(1)}.{m.group(2)}"),
    (re.compile(r"^fc\."), lambda m: "head"),
    (re.compile(r"^(conv_proj\.|class_token$|encoder\.pos_embedding$)"), lambda m: "embed"),
    (re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(ln_1|self_attention)\."),
     lambda m: f"layer{m.group(1)}.attn"),
    (re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(ln_2|mlp)\."), lambda m: f"layer{m.group(1)}.mlp"),
    (re.compile(r"^encoder\.ln\."), lambda m: "final_norm"),
    (re.compile(r"^heads\."), lambda m: "head"),
)


def block_key(name: str) -> str:
    """The `block` preset's group of one parameter name (see the module docstring)."""
    for pattern, group in _RULES:
        m = pattern.search(name)
        if m:
            return group(m)
    return name.split(".", 1)[0]
