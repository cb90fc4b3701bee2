"""TracIn / gradient dot product: K = I, so Ψ = Φ (referenced, not copied, when Φ is float32)."""
from __future__ import annotations

import os

import numpy as np

from gradtrace.methods.base import Method
from gradtrace.methods.checks import raise_if_nonfinite
from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.rows import allocate_psi, as_float32_rows, effective_chunk_rows, finish_psi, row_chunks


class TracIn(Method):
    """τ(q, n) = φ(q) · φ(x_n). One pass over Φ checks it is finite; Ψ is Φ itself.

    Φ (array or memmap, of any storage dtype: scoring upcasts each row chunk to float32) is referenced as Ψ, so
    memory does not grow with N; a given `psi_path` gets a float32 copy written in row chunks.
    """

    name = "tracin"

    def _fit(self, phi: np.ndarray, group_slices: list[tuple[str, int, int]], *, chunk_rows: int,
             progress: bool, psi_path: str | os.PathLike | None) -> FittedMethod:
        n, k = phi.shape
        copy = psi_path is not None
        psi = allocate_psi(n, k, psi_path) if copy else phi
        rows = effective_chunk_rows(chunk_rows, 4 * k)
        for start, stop in row_chunks(n, rows, progress=progress, desc="tracin: check features"):
            block = as_float32_rows(phi, start, stop)
            raise_if_nonfinite(block, start, "training features")
            if copy:
                psi[start:stop] = block
        info = {"method": self.name, "kernel": "identity", "c": None, "lambda": None,
                "lambda_per_group": None, "N": int(n), "k": int(k),
                "groups": [name for name, _, _ in group_slices]}
        return FittedMethod(psi=finish_psi(psi) if copy else psi, group_slices=group_slices, info=info)
