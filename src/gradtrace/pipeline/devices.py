"""Where a stage runs its model: `--device auto|cpu|cuda` (auto = the first GPU when one is present; the options are
in `gradtrace.pipeline.specs.devices`, the precisions in `gradtrace.precision`)."""
from __future__ import annotations

import torch

from gradtrace.errors import UserError
from gradtrace.ranks import local_rank


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
