"""Facts about a layer's type that both the featurizers (`features/`) and the adapters need.

    is_transposed_linear(module)    # transformers' Conv1D (GPT-2): a linear layer whose weight is stored (d_in, d_out)

Recognised by name and shape, so nothing here imports transformers.
"""
from __future__ import annotations

import torch
from torch import nn


def is_transposed_linear(module: nn.Module) -> bool:
    """A linear layer that stores its weight as (d_in, d_out) and computes x @ W + b: transformers' `Conv1D`
    (GPT-2's attention and MLP layers), recognised by its name and shape without importing transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2
            and getattr(module, "nf", None) == weight.shape[1])
