"""The causal LM as influence functions (EK-FAC, kronfluence) run it: every trainable transformers `Conv1D` (GPT-2's
attention and MLP projections, weight stored (d_in, d_out), y = x W + b) becomes the equivalent `nn.Linear`
(weight Wᵀ, same bias, same outputs), because kronfluence only tracks `nn.Linear` and `nn.Conv2d`.

    twin = linear_twin(model)       # a copy: the checkpoint's model is untouched; parameter names are kept

The replacement keeps each module's name, so a parameter's group (`groups.py`) and the per-module scores map
back to the same groups as the features'. Frozen Conv1D layers (the base of a LoRA fine-tune, whose LoRA factors
are `nn.Linear` already) are left as they are: only trainable weights are scored. The twin computes the same
logits as the model (up to float rounding of the transposed product), in eval mode like the model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from gradtrace.adapters.layers import is_transposed_linear


def as_linear(conv1d: nn.Module) -> nn.Linear:
    """nn.Linear(d_in, d_out) with weight = Conv1D weightᵀ (contiguous) and the same bias; trainability kept."""
    d_in, d_out = conv1d.weight.shape
    bias = getattr(conv1d, "bias", None)
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=conv1d.weight.device, dtype=conv1d.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(conv1d.weight.requires_grad)
    if bias is not None:
        linear.bias.requires_grad_(bias.requires_grad)
    return linear


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` with every trainable Conv1D replaced by `as_linear` of it (module docstring)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if name and is_transposed_linear(module) and module.weight.requires_grad:
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, as_linear(module))
    twin.eval()
    return twin
