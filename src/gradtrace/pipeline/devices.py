"""Which device a stage computes on: `--device auto|cpu|cuda` (auto = the first GPU when one is present)."""
from __future__ import annotations

import torch

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import option

DEVICES = ("auto", "cpu", "cuda")


def device_option():
    return option("auto", "where to compute: auto (a GPU when present, else the CPU), cpu or cuda", choices=DEVICES)


def resolve_device(name: str) -> torch.device:
    """torch.device of a --device value; cuda without a GPU is refused in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU here; use --device cpu (or auto)")
    return torch.device(name)
