"""Where Ψ = Φ K lives while the λ search and the weight learner read it: in memory up to a budget, else in a
temporary `.npy` memmap beside the training store (its disk, not this process's memory), removed afterwards.

Scoring never writes Ψ for large stores (the query-side mode); the weight learner and the label-free λ search
read Ψ's rows, N · k · 4 bytes (32 GB at N = 1,000,000 and k = 8,192), so above the budget they read them from
disk through the page cache. `GRADTRACE_PSI_IN_MEMORY_BYTES` sets the budget (default 4 GiB).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.io import writer_temp
from gradtrace.methods import BaseMethod

BUDGET_ENV = "GRADTRACE_PSI_IN_MEMORY_BYTES"
PSI_NAME = "psi.npy"  # temporary files are .psi.npy.HOST-PID.XXXX.tmp.npy beside the store
DEFAULT_BUDGET = 4 * 2**30


def psi_budget() -> int:
    """The most bytes of Ψ held in memory (`GRADTRACE_PSI_IN_MEMORY_BYTES`, default 4 GiB)."""
    raw = os.environ.get(BUDGET_ENV)
    if raw is None:
        return DEFAULT_BUDGET
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"{BUDGET_ENV}={raw!r} is not a number of bytes; set it to a whole number (e.g. 4294967296) "
                        "or unset it")
    return value


@contextmanager
def psi_place(train: FeatureStore, base: BaseMethod):
    """None (Ψ in memory: small enough, or a method that never writes Ψ) or a temporary path for Ψ's memmap,
    deleted when the block ends."""
    n, k = train.features.shape
    if not base.uses_lambda or base.needs_model or 4 * n * k <= psi_budget():
        yield None
        return
    where = train.path if os.access(train.path, os.W_OK) else Path(tempfile.gettempdir())
    path = writer_temp(where / PSI_NAME, ".tmp.npy")  # a dead run's file (this host's) is removed first
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)

