"""Parameter groups: named, disjoint sets of parameter tensors that cover every trainable parameter.

Presets:
- ``tensor``: one group per parameter tensor (the group name is the parameter name).
- ``module``: one group per leaf module (the parameter name without its last component).
- ``block``: the diffusers structure: ``conv_in``, ``time_embedding``, each ``down_blocks.i``,
  ``mid_block``, each ``up_blocks.i``, ``conv_out`` (with the output norm), the conditioning
  embedding; inside attention the query / key / value / output projections get their own groups,
  with self-attention and cross-attention kept apart (``down_blocks.1.self_attn.q``,
  ``up_blocks.1.cross_attn.out``...).
- custom patterns: ``"name=regex,regex;name2=regex"``; every parameter goes to the first group with a
  matching regex (``re.search`` on its name), the unmatched rest to a group named ``other``.

Group order follows the order in which a group's first parameter appears in the model, so names and
column slices are stable for a given architecture.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from gradtrace.errors import UserError

PRESETS = ("tensor", "module", "block")
WRAPPER_PREFIX = "unet."


@dataclass(frozen=True)
class Group:
    name: str
    params: tuple[str, ...]


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def make_groups(model: torch.nn.Module, spec: str = "block") -> list[Group]:
    """Groups for `model` from a preset name or a pattern spec (see module docstring)."""
    names = trainable_names(model)
    if not names:
        raise UserError("the model has no trainable parameters; nothing to attribute")
    if spec in PRESETS:
        key = {"tensor": _tensor_key, "module": _module_key, "block": block_key}[spec]
        return _collect(names, key)
    if "=" in spec:
        return _collect(names, _pattern_key(parse_patterns(spec)))
    raise UserError(f"unknown group preset '{spec}'; use one of {', '.join(PRESETS)} "
                    f"or patterns like 'attn=attn;conv=conv'")


def describe(groups: list[Group]) -> list[dict]:
    return [{"name": g.name, "params": list(g.params)} for g in groups]


def parse_patterns(spec: str) -> list[tuple[str, list[re.Pattern]]]:
    out: list[tuple[str, list[re.Pattern]]] = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if "=" not in part:
            raise UserError(f"group pattern '{part}' has no '='; write name=regex[,regex...]")
        name, regexes = part.split("=", 1)
        name = name.strip()
        if not name or name == "other" or any(name == n for n, _ in out):
            raise UserError(f"group name '{name}' is empty, reserved or repeated; choose distinct names")
        try:
            out.append((name, [re.compile(r.strip()) for r in regexes.split(",") if r.strip()]))
        except re.error as exc:
            raise UserError(f"bad regex in group '{name}': {exc}; fix the pattern")
    if not out:
        raise UserError("empty group pattern spec; write name=regex[,regex...];...")
    return out


def _collect(names: list[str], key) -> list[Group]:
    order: dict[str, list[str]] = {}
    for n in names:
        order.setdefault(key(n), []).append(n)
    return [Group(name=g, params=tuple(ps)) for g, ps in order.items()]


def _tensor_key(name: str) -> str:
    return name


def _module_key(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _pattern_key(patterns):
    def key(name: str) -> str:
        for gname, regexes in patterns:
            if any(r.search(name) for r in regexes):
                return gname
        return "other"

    return key


_ATTN_PROJ = re.compile(r"\.(to_q|to_k|to_v|to_out)(\.|$)")
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
    m = _ATTN_PROJ.search(inner)
    if m and ".attentions." in f".{inner}":
        kind = "cross_attn" if ".attn2." in inner else "self_attn"
        return f"{block}.{kind}.{_PROJ_NAME[m.group(1)]}"
    return block
