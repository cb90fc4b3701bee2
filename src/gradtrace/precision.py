"""Compute precision of the stages that run a model (`--dtype float32|bfloat16`).

float32 is the default and what every test and benchmark of record uses. bfloat16 halves the memory traffic
of the model's forward and backward on hardware that has it (GPUs; recent CPUs), at the cost of about three
significant digits:

* train and sample run under `torch.autocast` (parameters and optimizer state stay float32);
* featurize runs each example's forward and backward through bfloat16 copies of the parameters and inputs
  (`torch.func` transforms do not compose with autocast), and the gradients it projects are float32.

Scoring (the kernels, the Cholesky solves, top-k) always computes in float64/float32 on the CPU: it is not where
the time goes, and its exactness is what the tests pin.
"""
from __future__ import annotations

import contextlib

import torch

from gradtrace.choices import PRECISIONS  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_precision(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise UserError(f"unknown compute dtype '{name}'; use one of {', '.join(PRECISIONS)}")
    return TORCH_DTYPES[name]


def autocast(device: torch.device | str, name: str):
    """A context in which the model's forward runs at precision `name` (a no-op for float32)."""
    dtype = check_precision(name)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def cast_floating(value, dtype: torch.dtype):
    """`value` with every floating tensor in it (a tensor, or a tuple/list/dict of them) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value
