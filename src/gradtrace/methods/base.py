"""The base-method interface. Every base method's currency is the per-group contribution c_j(q, n), with
τ_w(q, n) = Σ_j w_j c_j(q, n); what differs is what it reads to compute them:

- `Method` (feature kernels: TracIn, TRAK, D-TRAK, DAS): a bilinear kernel K on stored gradient features,
  τ(q, n) = φ(q)ᵀ K φ(x_n) = φ(q) · ψ(x_n). It holds only configuration; `fit` reads the training features in
  row chunks and returns a `FittedMethod` (contributions, top-k, scores, self-contributions).
- `ModelMethod` (`gradtrace.methods.model_method`; EK-FAC): works on the model and its examples directly; `session`
  opens the checkpoint and returns a `ModelSession` (fit, contributions, top-k, self-contributions).

Facts a stage needs are properties of `BaseMethod`, never name tests: `needs_model` (which of the two kinds, so which
inputs a stage reads), `uses_lambda` (a damping λ = c · a scale: c, `--lambda-c auto` and the λ grid apply),
`default_c` and `lambda_grid()` (the label-free search's values of c), `kernel_kind` and `info()`.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gradtrace.errors import UserError
from gradtrace.methods.checks import check_group_slices, check_positive_int, check_train_matrix
from gradtrace.methods.fitted import FittedMethod

__all__ = ["BaseMethod", "Method", "FittedMethod", "lambda_grid"]


def lambda_grid(num: int = 9, low: float = 1e-4, high: float = 1.0) -> np.ndarray:
    """Log-spaced values of c (λ = c · mean diag of the Gram) from `low` to `high`; default 1e-4..1, 9 points."""
    if int(num) != num or num < 1:
        raise UserError(f"num must be a positive integer, got {num!r}")
    if not (0 < low <= high):
        raise UserError(f"need 0 < low <= high for a log grid, got low={low}, high={high}")
    return np.logspace(np.log10(low), np.log10(high), int(num))


class BaseMethod(ABC):
    """What every base method is, feature kernel or model method: a name and its facts as properties."""

    name: str = "method"
    uses_lambda: bool = False
    needs_model: bool = False
    default_c: float | None = None      # the λ scale used when none is given (methods with a λ)
    lambda_grid_size: int = 9           # values of c (1e-4..1) the label-free choice (--lambda-c auto) tries

    @property
    def kernel_kind(self) -> str:
        return "identity"

    def lambda_grid(self) -> np.ndarray:
        """The values of c that `--lambda-c auto` tries (log-spaced 1e-4..1)."""
        return lambda_grid(self.lambda_grid_size)

    def config(self) -> dict[str, Any]:
        """The method's settings as a JSON-able dict."""
        return {"method": self.name}

    def info(self) -> dict[str, Any]:
        """What a manifest records about the configured method (its settings and facts)."""
        return {**self.config(), "kernel": self.kernel_kind, "needs_model": self.needs_model,
                "uses_lambda": self.uses_lambda}

    def with_c(self, c: float) -> "BaseMethod":
        """The same method at λ scale c (methods without λ: itself)."""
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({args})"


class Method(BaseMethod):
    """A base attribution method. Subclasses set `name` and implement `_fit`.

    Facts callers need are properties, never name tests: `uses_lambda` (a damping λ = c · mean diag, so a λ
    scale c, 'auto' and the λ grid apply), `kernel_kind` ("identity", "shared", "per-group"), and
    `required_measurement` (features must come from this measurement, e.g. D-TRAK's; None = any), and
    `needs_row_scale` (each training example's scores are multiplied by a per-example factor the feature store
    keeps beside the features, e.g. DAS's residual factor: pass it to `fit(row_scale=)`), `supports_query_side` and
    `shares_gram` (TRAK's cheaper paths for large stores and for the λ search).
    """

    required_measurement: str | None = None
    needs_row_scale: bool = False
    supports_query_side: bool = False  # fit(query_side=True): K applied to the queries, Φ scored as it is
    shares_gram: bool = False          # gram() once, then fit(gram=) for each c (the label-free λ search)

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

