"""How many threads the weight learner's dense work runs on: torch's and the BLAS libraries' that numpy loaded.

    with threads(1):     # both set to 1 inside, restored on exit
        ...
"""
from __future__ import annotations

import contextlib

import torch
from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn

_CONTROLLER: list = []  # the ThreadpoolController, made on first use (it inspects the loaded libraries)


@contextlib.contextmanager
def threads(n: int | None):
    """Context: torch and the BLAS libraries numpy loaded run on `n` threads (restored on exit; None: as they are)."""
    if n is None:
        yield
        return
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    torch_before = torch.get_num_threads()
    limit = _CONTROLLER[0].limit(limits=int(n), user_api="blas")
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(torch_before)
        limit.restore_original_limits()
