"""The numerics a chunk of features was computed under, and the rule that keeps one store from mixing them.

Floating-point results depend on how a reduction is split: the same example featurized with one torch thread and
with two gives rows that differ in the last bits (max abs difference ~1e-7 on the digits store, every row), and so
may another device, compute dtype or torch/numpy version. A store's rows are bit-identical to a clean run's only
when every chunk was computed under the same numerics. So each writer records, with every chunk it finishes, the
numerics it computed it under (`current`: torch's thread count, the device type, the compute dtype, the torch and
numpy versions; `gradtrace.features.progress` keeps them per chunk), and a store is refused in one line when its
chunks would mix numerics (a resume, another rank, a merge) — unless the writer passes `--allow-mixed-numerics`,
which the manifest then records (`mixed_numerics_allowed`). The ranks of a torchrun job run one thread each, so
they agree with each other; finishing such a store without torchrun needs one thread too (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from gradtrace.errors import UserError

KEYS = ("threads", "device", "dtype", "torch", "numpy")


def current(device=None, precision: str = "float32") -> dict:
    """The numerics this process computes features under (on `device`, default the CPU, in `precision`)."""
    kind = torch.device(device).type if device is not None else "cpu"
    return {"threads": int(torch.get_num_threads()), "device": kind, "dtype": str(precision),
            "torch": torch.__version__, "numpy": np.__version__}


def numerics_id(numerics: dict) -> str:
    """A short stable key of a numerics record (progress files keep a table of them, one key per chunk)."""
    return hashlib.sha256(json.dumps(numerics, sort_keys=True).encode()).hexdigest()[:12]


def difference(a: dict, b: dict) -> str:
    """What differs between two records, e.g. "threads 2 vs 1"."""
    parts = [f"{k} {a.get(k)} vs {b.get(k)}" for k in KEYS if a.get(k) != b.get(k)]
    return ", ".join(parts) or "same numerics"


def distinct(records) -> list[dict]:
    """The different numerics among `records` (None = written before numerics were recorded: unknown, skipped),
    in first-seen order."""
    out: list[dict] = []
    for record in records:
        if record is not None and record not in out:
            out.append(record)
    return out


def check_not_mixed(records, where: str, *, allowed: bool, now: dict | None = None) -> None:
    """Refuse, in one line, rows under different numerics in one store (`records`: the numerics of its recorded
    chunks; `now`: those of the rows about to be written), unless `allowed`."""
    seen = distinct([*records, now])
    if allowed or len(seen) < 2:
        return
    first, other = (seen[0], now) if now is not None and now != seen[0] else (seen[0], seen[1])
    hint = f" (e.g. OMP_NUM_THREADS={first['threads']})" if first.get("threads") != other.get("threads") else ""
    raise UserError(f"{where} would mix rows computed under other numerics ({difference(first, other)}): its bytes "
                    f"would differ from a clean run's; write it under the numerics of its other rows{hint}, or pass "
                    "--allow-mixed-numerics (recorded in the store's manifest)")
