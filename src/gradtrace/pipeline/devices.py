"""Where and at what precision a stage runs its model: `--device auto|cpu|cuda` (auto = the first GPU when one
is present) and `--dtype float32|bfloat16` (see `gradtrace.precision`)."""
from __future__ import annotations

import torch

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import option
from gradtrace.precision import PRECISIONS
from gradtrace.ranks import local_rank

DEVICES = ("auto", "cpu", "cuda")


def device_option():
    return option("auto", "where to compute: auto (a GPU when present, else the CPU), cpu or cuda", choices=DEVICES)


def dtype_option():
    return option("float32", "compute precision of the model's forward and backward: float32, or bfloat16 (faster "
                  "where the hardware has it; about three significant digits)", choices=PRECISIONS)


def resolve_device(name: str) -> torch.device:
    """torch.device of a --device value; cuda without a GPU is refused in one line. Under torchrun a GPU is
    the one of the process's LOCAL_RANK (one process per GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU here; use --device cpu (or auto)")
    if name == "cuda":
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={index} but torch sees {torch.cuda.device_count()} GPU(s) here; start at "
                            "most one process per GPU (--nproc-per-node)")
        return torch.device("cuda", index)
    return torch.device(name)
