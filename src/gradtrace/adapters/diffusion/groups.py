"""The `block` group preset of the diffusers UNets: the group name of a parameter, and back.

``block_key`` names a parameter's group after the diffusers structure: ``conv_in``, ``time_embedding``,
each ``down_blocks.i``, ``mid_block``, each ``up_blocks.i``, ``conv_out`` (with the output norm), the
conditioning embedding; inside attention the query / key / value / output projections get their own groups,
with self-attention and cross-attention kept apart (``down_blocks.1.self_attn.q``,
``up_blocks.1.cross_attn.out``...). ``describe_group`` reads such a name back (for the pictures). Both use
the one grammar below: ``<block>[.<self_attn|cross_attn>.<q|k|v|out>][.<lora_A|lora_B>]`` (LoRA factors of a
module, where present, are groups of their own).
"""
from __future__ import annotations

import re

WRAPPER_PREFIX = "unet."
PRESETS = ("block",)
_KIND_LABEL = {"self_attn": "self", "cross_attn": "cross"}
_ATTN_PROJ = re.compile(r"\.(to_q|to_k|to_v|to_out)(\.|$)")
_LORA = re.compile(r"\.(lora_A|lora_B)(\.|$)")
_PROJ_NAME = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out": "out"}


def block_key(name: str) -> str:
    """The `block` preset's group for one parameter name."""
    inner = name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else None
    if inner is None:  # parameters outside the UNet (e.g. the conditioning embedding)
        return name.split(".", 1)[0]
    parts = inner.split(".")
    head = parts[0]
    if head in ("down_blocks", "up_blocks") and len(parts) > 1:
        block = f"{head}.{parts[1]}"
    elif head in ("conv_norm_out", "conv_out"):
        block = "conv_out"
    elif head in ("time_embedding", "time_proj"):
        block = "time_embedding"
    else:
        block = head
    lora = _LORA.search(inner)
    suffix = f".{lora.group(1)}" if lora else ""
    m = _ATTN_PROJ.search(inner)
    if m and ".attentions." in f".{inner}":
        kind = "cross_attn" if ".attn2." in inner else "self_attn"
        return f"{block}.{kind}.{_PROJ_NAME[m.group(1)]}{suffix}"
    return block + suffix


def describe_group(name: str) -> dict:
    """{"block", "attention" ("self" / "cross" / None), "projection" ("q"/"k"/"v"/"out"/None), "label"}
    for a `block`-preset group name such as "up_blocks.0.cross_attn.k" or "mid_block"."""
    parts = str(name).split(".")
    for i, part in enumerate(parts):
        if part in _KIND_LABEL and i + 1 < len(parts):
            block, kind, proj = ".".join(parts[:i]), _KIND_LABEL[part], ".".join(parts[i + 1:])
            return {"block": block, "attention": kind, "projection": proj, "label": f"{block} {kind} {proj}"}
    block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1 else parts[0]
    if block.startswith("cond_"):
        block = "cond_embed"
    label = str(name) if block == name else f"{block} ({name})"
    return {"block": block, "attention": None, "projection": None, "label": label}
