"""Parameter groups: named, disjoint sets of parameter tensors that cover every trainable parameter.

Presets:
- ``tensor``: one group per parameter tensor (the group name is the parameter name).
- ``module``: one group per leaf module (the parameter name without its last component).
- an adapter's own presets (e.g. the diffusion adapters' ``block``), passed as `preset_key`: a function
  from a preset name to its parameter-name → group-name rule (None when it is not one of them).
- custom patterns: ``"name=regex,regex;name2=regex"``; every parameter goes to the first group with a
  matching regex (``re.search`` on its name), the unmatched rest to a group named ``other``.

Group order follows the order in which a group's first parameter appears in the model, so names and
column slices are stable for a given architecture.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from gradtrace.errors import UserError

PRESETS = ("tensor", "module")


@dataclass(frozen=True)
class Group:
    name: str
    params: tuple[str, ...]


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def make_groups(model: torch.nn.Module, spec: str = "module",
                preset_key: Callable[[str], Callable[[str], str] | None] | None = None,
                adapter_presets: tuple[str, ...] = ()) -> list[Group]:
    """Groups for `model` from a preset name or a pattern spec (see module docstring)."""
    names = trainable_names(model)
    if not names:
        raise UserError("the model has no trainable parameters; nothing to attribute")
    key = preset_key(spec) if preset_key is not None else None
    if key is not None:
        return _collect(names, key)
    if spec in PRESETS:
        return _collect(names, {"tensor": _tensor_key, "module": _module_key}[spec])
    if "=" in spec:
        patterns = parse_patterns(spec)
        groups = _collect(names, _pattern_key(patterns))
        found = {g.name for g in groups}
        empty = [name for name, _ in patterns if name not in found]
        if empty:
            raise UserError(f"group pattern '{empty[0]}' matches no trainable parameter (its parameters would "
                            f"land in 'other'); fix the regex (parameter names look like {names[0]})")
        return groups
    raise UserError(f"unknown group preset '{spec}'; use one of {', '.join((*PRESETS, *adapter_presets))} "
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
