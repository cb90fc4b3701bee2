"""The base-method interface: a bilinear kernel K that turns training features Φ into Ψ = Φ K.

    τ(q, n) = φ(q)ᵀ K φ(x_n) = φ(q) · ψ(x_n)

A `Method` holds only configuration; `fit` reads the training features in row chunks and returns a
`FittedMethod` that scores queries.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gradtrace.errors import UserError
from gradtrace.methods.checks import check_group_slices, check_positive_int, check_train_matrix
from gradtrace.methods.fitted import FittedMethod

__all__ = ["Method", "FittedMethod"]


class Method(ABC):
    """A base attribution method. Subclasses set `name` and implement `_fit`.

    Facts callers need are properties, never name tests: `uses_lambda` (a damping λ = c · mean diag, so a λ
    scale c, 'auto' and the λ grid apply), `kernel_kind` ("identity", "shared", "per-group"), and
    `required_measurement` (features must come from this measurement, e.g. D-TRAK's; None = any), and
    `needs_row_scale` (each training example's scores are multiplied by a per-example factor the feature store
    keeps beside the features, e.g. DAS's residual factor: pass it to `fit(row_scale=)`).
    """

    name: str = "method"
    uses_lambda: bool = False
    required_measurement: str | None = None
    needs_row_scale: bool = False

    @property
    def kernel_kind(self) -> str:
        return "identity"

    def check_measurement(self, measurement: str, where: str) -> None:
        """Refuse features of another measurement than this method requires, with a one-line reason."""
        need = self.required_measurement
        if need is not None and measurement != need:
            raise UserError(f"method '{self.name}' needs features of measurement '{need}', but {where} was "
                            f"featurized with '{measurement}'; featurize with --measurement {need} or use "
                            f"another --method")

    def fit(self, train_features: Any, group_slices: Any, *, chunk_rows: int = 65536, progress: bool = False,
            psi_path: str | os.PathLike | None = None) -> FittedMethod:
        """Fit on training features Φ (N, k) with the given group layout.

        `train_features` may be a read-only np.memmap; it is read in blocks of `chunk_rows` rows (lowered
        if one block would exceed ~256 MiB of working memory). `psi_path` writes Ψ to a `.npy` memmap
        there instead of memory (for large N). Features with NaN/Inf raise UserError naming the rows.
        """
        phi = check_train_matrix(train_features)
        slices = check_group_slices(group_slices, phi.shape[1])
        rows = check_positive_int(chunk_rows, "chunk_rows")
        return self._fit(phi, slices, chunk_rows=rows, progress=progress, psi_path=psi_path)

    @abstractmethod
    def _fit(self, phi: np.ndarray, group_slices: list[tuple[str, int, int]], *, chunk_rows: int,
             progress: bool, psi_path: str | os.PathLike | None) -> FittedMethod:
        """Fit on checked inputs."""

    def config(self) -> dict[str, Any]:
        """The method's settings as a JSON-able dict (recorded in FittedMethod.info)."""
        return {"method": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({args})"
