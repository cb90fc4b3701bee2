"""TRAK (and D-TRAK): the regularised inverse-Gram kernel.

    shared:     K = (ΦᵀΦ + λ I)⁻¹,                  λ   = c · mean diag(ΦᵀΦ)
    per-group:  K = blockdiag_j (Φ_jᵀΦ_j + λ_j I)⁻¹,  λ_j = c · mean diag(Φ_jᵀΦ_j)   (one c for all groups)

Group weights inside the shared kernel (`feature_weights` w, one per group; an aspect's weights on the shared
kernel): TRAK on gradients whose block j is scaled by √w_j, written as a kernel on the unscaled features,

    K_w = D (D ΦᵀΦ D + λ_w I)⁻¹ D,   D = diag(√w_j on group j's columns),   λ_w = c · mean diag(D ΦᵀΦ D)

so the Gram blocks (and their cache) are the unweighted ones. On the per-group kernel the scaling cancels (block j's
λ_j scales with w_j), so there weights act on the query side only.

Three passes of work: the Gram matrix accumulated in float64 over row chunks; a float64 Cholesky solve
(eigh pseudo-inverse when the matrix is not numerically positive definite); Ψ = Φ K computed chunkwise in
float64 and stored as float32. D-TRAK is this kernel on features of another measurement, so it is the
same class under another name.

A block wider than the training set and than DUAL_MIN_WIDTH (k_j > max(N, 256), e.g. exact gradients of a
small training set) is solved in its dual form: with A_j = Φ_j Φ_jᵀ (N × N),
Ψ_j = Φ_j (Φ_jᵀΦ_j + λ_j I)⁻¹ = (A_j + λ_j I)⁻¹ Φ_j (the push-through identity; for λ_j = 0 both are Φ_j⁺ᵀ),
so no k_j × k_j matrix is built. λ_j is the same, c · trace(A_j) / k_j = c · mean diag(Φ_jᵀΦ_j). Only Ψ is
written in this form (not the query-side mode).

Default c = 0.01. λ = c · mean diag(ΦᵀΦ) is c times the mean eigenvalue of the Gram matrix, so c is
scale-free (rescaling the features leaves the scores' ranking unchanged). At c = 0.01, directions
carrying more than ~1% of the average energy are whitened almost exactly (the TRAK inverse), weaker
directions — noise, or unidentified ones when N < k or columns are near-collinear — are damped, and the
condition number of Φ_jᵀΦ_j + λ_j I is at most 1 + k_j / c, safe for a float64 solve and float32
storage. It is the geometric middle of the label-free search grid 1e-4..1 (`lambda_grid`), so the
default never sits at an edge of that search. c matters (LDS moved by 0.06 over a 10⁴ range in the
reference experiment): choose it per dataset with the label-free objective when it counts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

from gradtrace.choices import DEFAULT_C, DEFAULT_KERNEL, KERNELS, check_c  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.methods.base import Method
from gradtrace.methods.checks import (
    check_group_slices,
    check_positive_int,
    check_same_layout,
    check_train_matrix,
    raise_if_nonfinite,
)
from gradtrace.methods.fitted import FittedMethod
from gradtrace.methods.rows import allocate_psi, effective_chunk_rows, finish_psi, row_chunks

# A shared kernel needs a few dense k x k float64 matrices (2 GiB each at this width).
MAX_SHARED_DIM = 16384
# A block wider than N (and than DUAL_MIN_WIDTH, below which either inverse is negligible) is solved in the dual
# form (N x N) while N stays at most MAX_DUAL_ROWS: its N³ inverse and N² k_j Gram beat the primal k_j³ and
# N k_j² (the label-free λ search repeats the inverse for each of its 9 values).
DUAL_MIN_WIDTH = 256
MAX_DUAL_ROWS = 16384


@dataclass
class Gram:
    """Float64 Gram blocks of Φ: one k × k block (shared) or one k_j × k_j block per group (per-group); a
    block wider than N holds A_j = Φ_j Φ_jᵀ (N × N) instead (`dual[j]`, see the module docstring)."""

    kernel: str
    blocks: list[np.ndarray]
    group_slices: list[tuple[str, int, int]]
    n: int
    dual: list[bool] | None = None

    def is_dual(self, j: int) -> bool:
        return bool(self.dual and self.dual[j])


def uses_dual(width: int, n: int) -> bool:
    """A block of `width` columns over `n` rows is solved in the dual form (N × N) when that is smaller and the
    primal k_j × k_j one is not cheap anyway."""
    return width > max(n, DUAL_MIN_WIDTH) and n <= MAX_DUAL_ROWS


def has_dual_blocks(kernel: str, group_slices: list[tuple[str, int, int]], n: int) -> bool:
    """Whether a TRAK kernel of this kind over these columns and `n` rows solves any block in the dual form."""
    k = group_slices[-1][2] if group_slices else 0
    return any(uses_dual(e - s, n) for s, e in kernel_spans(normalise_kernel(kernel), group_slices, k))


def kernel_spans(kernel: str, group_slices: list[tuple[str, int, int]], k: int) -> list[tuple[int, int]]:
    return [(0, k)] if kernel == "shared" else [(s, e) for _, s, e in group_slices]


def add_chunk_gram(blocks: list[np.ndarray], x: np.ndarray, spans: list[tuple[int, int]]) -> bool:
    """Add one row chunk's share x_jᵀ x_j (float64) to each block; False (nothing added) when the chunk holds NaN/Inf.

    Each group's columns are copied once to a contiguous float64 block (exact: float32 and float16 values are
    float64 numbers, and so are their products), so no float64 copy of the whole chunk is made; a NaN or Inf in a
    row makes a diagonal entry of its block's product non-finite, so the check costs one look at the diagonals
    (the spans tile every column). The products go through torch (its CPU BLAS took 1.2x the scoring floor's time
    where numpy's took 1.65x: `bench/bench_gram_pass.py`); their bits do not depend on the copies' alignment."""
    products = []
    for s, e in spans:
        xs = torch.from_numpy(np.array(x[:, s:e], dtype=np.float64, order="C"))
        g = (xs.T @ xs).numpy()
        if not np.isfinite(np.diagonal(g)).all():
            return False
        products.append(g)
    for block, g in zip(blocks, products):
        block += g
    return True


def accumulate_gram(phi: np.ndarray, group_slices: list[tuple[str, int, int]], kernel: str, *,
                    chunk_rows: int = 65536, progress: bool = False) -> Gram:
    """ΦᵀΦ (or its diagonal blocks) in float64, reading Φ in row chunks; NaN/Inf rows raise UserError.
    Blocks wider than N hold Φ_j Φ_jᵀ, computed from the whole column block."""
    n, k = phi.shape
    spans = kernel_spans(kernel, group_slices, k)
    dual = [uses_dual(e - s, n) for s, e in spans]
    blocks = [np.zeros((n, n) if d else (e - s, e - s), dtype=np.float64) for (s, e), d in zip(spans, dual)]
    primal = [(b, span) for b, span, d in zip(blocks, spans, dual) if not d]
    rows = effective_chunk_rows(chunk_rows, 8 * k)
    for start, stop in row_chunks(n, rows, progress=progress, desc="trak: gram"):
        x = phi[start:stop]
        if any(dual):  # the dual blocks' columns are not in the chunk products: look at every value
            raise_if_nonfinite(np.asarray(x, dtype=np.float32), start, "training features")
        if not add_chunk_gram([b for b, _ in primal], x, [span for _, span in primal]):
            raise_if_nonfinite(np.asarray(x, dtype=np.float64), start, "training features")
            raise UserError(f"the Gram matrix of training rows {start}..{stop - 1} overflowed; rescale the features")
    for block, (s, e), d in zip(blocks, spans, dual):
        if d:
            xs = np.asarray(phi[:, s:e], dtype=np.float64)
            block += xs @ xs.T
    return Gram(kernel=kernel, blocks=blocks, group_slices=list(group_slices), n=int(n), dual=dual)


def regularised_inverse(gram: np.ndarray, c: float, scale: float | None = None) -> tuple[np.ndarray, float, float, str]:
    """(K, λ, mean diag, solver) with K = (G + λ I)⁻¹ and λ = c · mean diag(G) (or c · `scale`, given).

    Cholesky in float64; when G + λ I is not numerically positive definite (Cholesky fails, or its
    diagonal shows a condition number beyond ~1/(k·eps)), the eigh pseudo-inverse is used instead
    (eigenvalues below k·eps·max are dropped). A group whose features are all zero gets K = 0.
    """
    dim = gram.shape[0]
    scale = float(np.mean(np.diag(gram))) if scale is None else float(scale)
    lam = c * scale
    a = gram + lam * np.eye(dim)
    rcond = dim * np.finfo(np.float64).eps
    try:
        factor, lower = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
        d = np.abs(np.diag(factor))
        if d.min() > 0 and (d.min() / d.max()) ** 2 > rcond:
            k_mat = scipy.linalg.cho_solve((factor, lower), np.eye(dim), check_finite=False)
            return (k_mat + k_mat.T) / 2, lam, scale, "cholesky"
    except np.linalg.LinAlgError:
        pass
    evals, evecs = scipy.linalg.eigh(a, check_finite=False)
    top = max(float(evals.max()), 0.0)
    inv = np.zeros_like(evals)
    keep = evals > rcond * top
    inv[keep] = 1.0 / evals[keep]
    k_mat = (evecs * inv) @ evecs.T
    return (k_mat + k_mat.T) / 2, lam, scale, "eigh"


def spread_over_columns(weights: Any, group_slices: list[tuple[str, int, int]], k: int) -> np.ndarray:
    """(k,) float64: the weight of group j (`weights` in the order of `group_slices`) on each of its columns."""
    col = np.zeros(k)
    for wj, (_, s, e) in zip(np.asarray(weights, dtype=np.float64).ravel(), group_slices):
        col[s:e] = wj
    return col


class TRAK(Method):
    """TRAK kernel; `kernel="shared"` (one inverse over all columns) or `"per-group"` (block-diagonal).

    `c` (default 0.01, see the module docstring) sets λ = c · mean diag of the Gram matrix (per group
    for the per-group kernel). `name` is recorded in `info` ("trak", or "dtrak" for D-TRAK features).
    """

    name = "trak"
    uses_lambda = True
    default_c = DEFAULT_C
    supports_query_side = True
    shares_gram = True

    def __init__(self, c: float = DEFAULT_C, kernel: str = "shared", *, name: str = "trak",
                 required_measurement: str | None = None, needs_row_scale: bool = False,
                 group_c: dict[str, float] | None = None, feature_weights: dict[str, float] | None = None):
        self.c = check_c(c)
        self.kernel = normalise_kernel(kernel)
        # per-group damping: λ_j = group_c[name_j] · mean diag(Φ_jᵀΦ_j) (groups not named keep c)
        self.group_c = None if group_c is None else {str(k): check_c(v) for k, v in dict(group_c).items()}
        if self.group_c is not None and self.kernel != "per-group":
            raise UserError("per-group damping (group_c) needs kernel='per-group'")
        self.feature_weights = None if feature_weights is None else check_feature_weights(feature_weights)
        if self.feature_weights is not None and self.kernel != "shared":
            raise UserError("group weights inside the kernel need kernel='shared' (on the per-group kernel they "
                            "cancel); weight the queries instead")
        self.name = name
        self.required_measurement = required_measurement
        self.needs_row_scale = bool(needs_row_scale)

    @property
    def kernel_kind(self) -> str:
        return self.kernel

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "c": self.c, "kernel": self.kernel,
                **({"group_c": dict(self.group_c)} if self.group_c else {}),
                **({"feature_weights": dict(self.feature_weights)} if self.feature_weights else {})}

    def with_c(self, c: float) -> "TRAK":
        return TRAK(c, self.kernel, name=self.name, required_measurement=self.required_measurement,
                    needs_row_scale=self.needs_row_scale, group_c=self.group_c,
                    feature_weights=self.feature_weights)

    def with_feature_weights(self, weights: dict[str, float] | None) -> "TRAK":
        """The same kernel with group weights inside it (module docstring); None: without."""
        return TRAK(self.c, self.kernel, name=self.name, required_measurement=self.required_measurement,
                    needs_row_scale=self.needs_row_scale, group_c=self.group_c, feature_weights=weights)

    def c_of(self, group: str) -> float:
        """The λ scale of one group's block (its own with per-group damping, else c)."""
        return self.c if not self.group_c else self.group_c.get(group, self.c)

    def gram(self, train_features: Any, group_slices: Any, *, chunk_rows: int = 65536,
             progress: bool = False) -> Gram:
        """The Gram blocks this kernel needs; pass to `fit(..., gram=)` to refit several c cheaply."""
        phi = check_train_matrix(train_features)
        slices = check_group_slices(group_slices, phi.shape[1])
        self._check_width(phi.shape[1], phi.shape[0])
        return accumulate_gram(phi, slices, self.kernel, chunk_rows=check_positive_int(chunk_rows, "chunk_rows"),
                               progress=progress)

    def fit(self, train_features: Any, group_slices: Any, *, chunk_rows: int = 65536, progress: bool = False,
            psi_path: str | os.PathLike | None = None, gram: Gram | None = None,
            query_side: bool = False, row_scale: Any = None) -> FittedMethod:
        """As `Method.fit`; `gram` (from `self.gram` on the same features) skips the Gram pass.

        `query_side=True` keeps Φ as it is (e.g. a memmap) and applies K to the queries instead of writing
        Ψ = Φ K: same scores, no N × k copy (for scoring large stores; the weight learner needs Ψ).
        `row_scale` (N,): Ψ's row n is multiplied by row_scale[n] (methods with `needs_row_scale`, e.g. DAS)."""
        phi = check_train_matrix(train_features)
        slices = check_group_slices(group_slices, phi.shape[1])
        rows = check_positive_int(chunk_rows, "chunk_rows")
        if query_side and psi_path is not None:
            raise UserError("query_side=True writes no Ψ; drop psi_path")
        scale = self._check_row_scale(row_scale, phi.shape[0])
        if query_side and scale is not None:
            raise UserError(f"method '{self.name}' scales Ψ's rows; fit it without query_side")
        return self._fit(phi, slices, chunk_rows=rows, progress=progress, psi_path=psi_path, gram=gram,
                         query_side=query_side, row_scale=scale)

    def _check_row_scale(self, row_scale: Any, n: int) -> np.ndarray | None:
        if not self.needs_row_scale:
            if row_scale is not None:
                raise UserError(f"method '{self.name}' takes no per-example factor; drop row_scale")
            return None
        if row_scale is None:
            raise UserError(f"method '{self.name}' needs each training example's factor beside its features; "
                            f"featurize the training set with --measurement {self.required_measurement}")
        scale = np.asarray(row_scale, dtype=np.float64).reshape(-1)
        if scale.shape != (n,) or not np.isfinite(scale).all():
            raise UserError(f"the per-example factor must be {n} finite numbers (one per training row), got "
                            f"shape {scale.shape}; featurize the training set again")
        return scale

    def _fit(self, phi: np.ndarray, group_slices: list[tuple[str, int, int]], *, chunk_rows: int,
             progress: bool, psi_path: str | os.PathLike | None, gram: Gram | None = None,
             query_side: bool = False, row_scale: np.ndarray | None = None) -> FittedMethod:
        n, k = phi.shape
        self._check_width(k, n)
        if gram is None:
            gram = accumulate_gram(phi, group_slices, self.kernel, chunk_rows=chunk_rows, progress=progress)
        else:
            self._check_gram(gram, n, group_slices)
        spans = kernel_spans(self.kernel, group_slices, k)
        # a dual block's λ scale is mean diag(Φ_jᵀΦ_j) = trace(Φ_j Φ_jᵀ) / k_j
        names = ["all"] if self.kernel == "shared" else [g[0] for g in group_slices]
        if self.group_c and set(self.group_c) - set(names):
            raise UserError(f"group_c names groups the features do not have: "
                            f"{', '.join(sorted(set(self.group_c) - set(names)))}")
        col_w = None if self.feature_weights is None else self._column_weights(group_slices, k)
        if col_w is not None:
            solved = [self._weighted_inverse(gram, phi, col_w)]
        else:
            solved = [regularised_inverse(block, self.c_of(name),
                                          float(np.trace(block)) / (e - s) if gram.is_dual(j) else None)
                      for j, (block, (s, e), name) in enumerate(zip(gram.blocks, spans, names))]
        if query_side and any(gram.is_dual(j) for j in range(len(spans))):
            raise UserError(f"a kernel block wider than the {n} training rows is solved in its dual form, which "
                            f"writes Ψ; fit without query_side (or project to fewer columns than rows)")
        if query_side:
            return FittedMethod(psi=phi, group_slices=group_slices,
                                info={**self._info(solved, group_slices, n, k), "query_side": True},
                                query_kernel=[(sol[0], s, e) for sol, (s, e) in zip(solved, spans)])
        psi = allocate_psi(n, k, psi_path)
        rows = effective_chunk_rows(chunk_rows, 16 * k)
        for start, stop in row_chunks(n, rows, progress=progress, desc=f"{self.name}: psi"):
            x = np.asarray(phi[start:stop], dtype=np.float64)
            raise_if_nonfinite(x, start, "training features")
            if row_scale is not None:
                x = x * row_scale[start:stop, None]  # (e_n φ_n) K = e_n (φ_n K); a copy: x may view the input
            for j, ((k_mat, _, _, _), (s, e)) in enumerate(zip(solved, spans)):
                if not gram.is_dual(j):
                    psi[start:stop, s:e] = x[:, s:e] @ k_mat
        for j, ((inv_a, _, _, _), (s, e)) in enumerate(zip(solved, spans)):
            if gram.is_dual(j):  # Ψ_j = (A_j + λ_j I)⁻¹ Φ_j (Φ W with weights inside), then each row times its factor
                x = inv_a @ (np.asarray(phi[:, s:e], dtype=np.float64) * (1.0 if col_w is None else col_w))
                psi[:, s:e] = x if row_scale is None else x * row_scale[:, None]
        info = self._info(solved, group_slices, n, k)
        if gram.dual and any(gram.dual):
            info["dual_blocks"] = [name for name, d in zip(names, gram.dual) if d]

        if row_scale is not None:
            info["row_scale"] = {"min": float(row_scale.min()), "max": float(row_scale.max())}
        if self.feature_weights is not None:
            info["feature_weights"] = dict(self.feature_weights)
        return FittedMethod(psi=finish_psi(psi), group_slices=group_slices, info=info)

    def _column_weights(self, group_slices: list[tuple[str, int, int]], k: int) -> np.ndarray:
        """(k,) w_j on group j's columns."""
        names = [name for name, _, _ in group_slices]
        missing = sorted(set(names) - set(self.feature_weights))
        if missing or set(self.feature_weights) - set(names):
            raise UserError(f"the weights inside the kernel must name exactly the features' groups (missing: "
                            f"{', '.join(missing) or 'none'}); learn them on this store")
        return spread_over_columns([self.feature_weights[name] for name in names], group_slices, k)

    def _weighted_inverse(self, gram: Gram, phi: np.ndarray, col_w: np.ndarray) -> tuple[np.ndarray, float, float, str]:
        """K_w of the module docstring, as `regularised_inverse` returns it (λ_w and its scale are the weighted
        Gram's). In the dual form (k > N): (Φ W Φᵀ + λ_w I)⁻¹, with Ψ = that times Φ W (the push-through identity)."""
        if gram.is_dual(0):
            x = np.asarray(phi, dtype=np.float64)
            a_w = (x * col_w) @ x.T
            return regularised_inverse(a_w, self.c, float(np.trace(a_w)) / len(col_w))
        d = np.sqrt(col_w)
        k_w, lam, scale, solver = regularised_inverse(gram.blocks[0] * d[:, None] * d[None, :], self.c)
        return d[:, None] * k_w * d[None, :], lam, scale, solver

    # ---- helpers -------------------------------------------------------------------------------
    def _info(self, solved: list, group_slices: list[tuple[str, int, int]], n: int, k: int) -> dict[str, Any]:
        names = [name for name, _, _ in group_slices]
        info: dict[str, Any] = {"method": self.name, "kernel": self.kernel, "c": self.c,
                                "N": int(n), "k": int(k), "groups": names}
        if self.group_c:
            info["c_per_group"] = {name: self.c_of(name) for name in names}
        if self.kernel == "shared":
            _, lam, scale, solver = solved[0]
            info.update({"lambda": lam, "lambda_per_group": None, "gram_mean_diag": scale, "solver": solver})
        else:
            info.update({"lambda": None,
                         "lambda_per_group": {nm: s[1] for nm, s in zip(names, solved)},
                         "gram_mean_diag": {nm: s[2] for nm, s in zip(names, solved)},
                         "solver": {nm: s[3] for nm, s in zip(names, solved)}})
        return info

    def _check_width(self, k: int, n: int | None = None) -> None:
        if self.kernel == "shared" and k > MAX_SHARED_DIM and not (n is not None and uses_dual(k, n)):
            raise UserError(f"a shared TRAK kernel over {k} feature columns needs several {k}x{k} float64 "
                            f"matrices; use kernel='per-group' or project to <= {MAX_SHARED_DIM} columns")

    def _check_gram(self, gram: Gram, n: int, group_slices: list[tuple[str, int, int]]) -> None:
        if not isinstance(gram, Gram) or gram.kernel != self.kernel:
            found = getattr(gram, "kernel", type(gram).__name__)
            raise UserError(f"gram was computed for kernel '{found}' but this method uses '{self.kernel}'; "
                            f"compute it with the same method's .gram()")
        if gram.n != n:
            raise UserError(f"gram was computed on {gram.n} rows but the features have {n}; "
                            f"compute it on the same training features")
        check_same_layout(gram.group_slices, group_slices, "training features")


def check_feature_weights(weights: Any) -> dict[str, float]:
    """{group: w_j}, each finite and >= 0, not all zero."""
    out = {str(k): float(v) for k, v in dict(weights).items()}
    values = np.array(list(out.values()), dtype=np.float64)
    if not len(values) or not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise UserError("group weights inside the kernel must be finite, >= 0 and not all zero")
    return out


def normalise_kernel(kernel: Any) -> str:
    """'shared' or 'per-group' (also accepts 'per_group', 'pergroup', 'blockdiag'); else UserError."""
    key = str(kernel).strip().lower().replace("_", "-")
    key = {"pergroup": "per-group", "blockdiag": "per-group", "block-diagonal": "per-group"}.get(key, key)
    if key not in KERNELS:
        raise UserError(f"unknown TRAK kernel '{kernel}'; use one of: {', '.join(KERNELS)}")
    return key
