"""A fitted bilinear attribution method: the transformed training features Ψ = Φ K and how to score with them.

    τ_w(q, n) = Σ_j w_j φ_j(q) · ψ_j(x_n) = (w ⊙ φ(q)) · ψ(x_n)

Weights act on the query side only, so Ψ is computed once and every weighted score is one float32
matmul of the scaled query features against row chunks of Ψ (never a Q × N × M tensor).

Query-side mode (`query_kernel` set): K is symmetric, so φ(q)ᵀ K φ(x) = (K φ(q))ᵀ φ(x). Then `psi` holds
Φ itself (e.g. the feature store's memmap) and K is applied to the (few) queries instead of the (many)
training rows: no N × k copy of Ψ is ever made, and only the Ψ rows a caller asks for (the top-k rows of
`contributions`) are computed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradtrace.errors import UserError
from gradtrace.io import atomic_write, read_json, versions, write_json_atomic
from gradtrace.methods.checks import (
    block_scale,
    check_group_slices,
    check_matrix,
    check_positive_int,
    check_rows,
    check_same_layout,
    check_weights,
    raise_if_nonfinite,
)
from gradtrace.methods.rows import as_float32_rows, effective_chunk_rows, row_chunks
from gradtrace.methods.topk import RunningTopK

PSI_FILE = "psi.npy"
INFO_FILE = "method.json"
FORMAT = "gradtrace.fitted-method/1"
# contributions() refuses to build a dense (Q, rows, M) tensor larger than this; pass rows= instead.
MAX_CONTRIBUTION_BYTES = 2 * 2**30


@dataclass
class FittedMethod:
    """Ψ (N, k) float32 (in memory or a read-only .npy memmap), its group layout, and a JSON-able `info`.

    `info` records the method name, kernel kind, c and the λ values actually used, N and k.
    """

    psi: np.ndarray
    group_slices: list
    info: dict[str, Any] = field(default_factory=dict)
    query_kernel: list | None = None  # [(K_block float64, start, stop), ...]: psi holds Φ (query-side mode)

    def __post_init__(self) -> None:
        if self.psi.ndim != 2:
            raise UserError(f"psi must be 2-D (N, k), got shape {tuple(self.psi.shape)}")
        self.group_slices = check_group_slices(self.group_slices, self.psi.shape[1])
        if self.query_kernel is not None:
            for k_mat, start, stop in self.query_kernel:
                if k_mat.shape != (stop - start, stop - start) or not 0 <= start < stop <= self.psi.shape[1]:
                    raise UserError(f"query_kernel block of shape {k_mat.shape} does not fit columns "
                                    f"{start}:{stop} of {self.psi.shape[1]}")

    @property
    def query_side(self) -> bool:
        """True when `psi` holds Φ and the kernel is applied to the queries."""
        return self.query_kernel is not None

    def psi_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of Ψ = Φ K as float32 (computed in float64 in query-side mode)."""
        if not self.query_side:
            return as_float32_rows(self.psi, start, stop)
        return self._apply_kernel(np.asarray(self.psi[start:stop], dtype=np.float64))

    def _apply_kernel(self, x: np.ndarray) -> np.ndarray:
        """x K (blockwise, float64) as float32; x is (rows, k). K symmetric, so this is also K xᵀ."""
        out = np.zeros(x.shape, dtype=np.float64)
        for k_mat, start, stop in self.query_kernel:
            out[:, start:stop] = x[:, start:stop] @ k_mat
        return out.astype(np.float32)

    def _scoring_queries(self, qw: np.ndarray) -> np.ndarray:
        """What is multiplied with `psi` rows: w ⊙ φ(q), or K (w ⊙ φ(q)) in query-side mode."""
        return self._apply_kernel(qw.astype(np.float64)) if self.query_side else qw

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return int(self.psi.shape[0])

    @property
    def dim(self) -> int:
        return int(self.psi.shape[1])

    @property
    def n_groups(self) -> int:
        return len(self.group_slices)

    @property
    def group_names(self) -> list[str]:
        return [name for name, _, _ in self.group_slices]

    # ---- scoring -------------------------------------------------------------------------------
    def weighted_queries(self, query_features: Any, weights: Any = None, *, group_slices: Any = None) -> np.ndarray:
        """Checked query features as float32 (Q, k), block j scaled by weights[j] (w ⊙ φ(q))."""
        q = self._check_queries(query_features, group_slices)
        w = check_weights(weights, self.n_groups)
        if w is None:
            return np.asarray(q, dtype=np.float32)
        scale = block_scale(self.group_slices, w, self.dim)
        return (q.astype(np.float64) * scale).astype(np.float32)

    def scores(self, query_features: Any, weights: Any = None, *, chunk_rows: int = 65536,
               group_slices: Any = None, progress: bool = False) -> np.ndarray:
        """Scores τ_w (Q, N) float32 for every training row; `weights` (M,) non-negative or None (all ones)."""
        qw = self._scoring_queries(self.weighted_queries(query_features, weights, group_slices=group_slices))
        rows = effective_chunk_rows(check_positive_int(chunk_rows, "chunk_rows"), 4 * self.dim)
        out = np.empty((qw.shape[0], self.n_train), dtype=np.float32)
        for start, stop in row_chunks(self.n_train, rows, progress=progress, desc="scores"):
            out[:, start:stop] = qw @ as_float32_rows(self.psi, start, stop).T
        return out

    def topk(self, query_features: Any, k: int, weights: Any = None, *, chunk_rows: int = 65536,
             group_slices: Any = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The k best training rows per query: (indices (Q, k) int64, scores (Q, k) float32).

        Streams over Ψ in row chunks keeping a running top-k, so memory is O(Q · chunk) not O(Q · N).
        Sorted by descending score; ties go to the lower training index.
        """
        k = check_positive_int(k, "k")
        if k > self.n_train:
            raise UserError(f"k = {k} is larger than the training set ({self.n_train} rows); pass k <= {self.n_train}")
        qw = self._scoring_queries(self.weighted_queries(query_features, weights, group_slices=group_slices))
        n_q = qw.shape[0]
        rows = check_positive_int(chunk_rows, "chunk_rows")
        rows = effective_chunk_rows(rows, 4 * (self.dim + n_q))  # a Ψ block plus its (Q, rows) scores
        running = RunningTopK(n_q, k)
        for start, stop in row_chunks(self.n_train, rows, progress=progress, desc="top-k"):
            running.update(qw @ as_float32_rows(self.psi, start, stop).T, start)
        return running.result()

    def contributions(self, query_features: Any, *, rows: Any = None, group_slices: Any = None) -> np.ndarray:
        """Dense per-group contributions c_j(q, n) = φ_j(q) · ψ_j(x_n): (Q, N or len(rows), M) float32.

        For small N or a selection of rows only; summing over the last axis gives `scores`.
        """
        q = np.asarray(self._check_queries(query_features, group_slices), dtype=np.float32)
        sel = None if rows is None else check_rows(rows, self.n_train)
        n_rows = self.n_train if sel is None else len(sel)
        size = q.shape[0] * n_rows * self.n_groups * 4
        if size > MAX_CONTRIBUTION_BYTES:
            raise UserError(f"contributions for {q.shape[0]} queries x {n_rows} rows x {self.n_groups} groups "
                            f"would take {size / 2**30:.1f} GiB; pass rows= (e.g. the top-k indices)")
        if self.query_side:
            phi = self.psi[:] if sel is None else self.psi[sel]
            if q.shape[0] <= n_rows and self._kernel_within_groups():  # (K_j φ_j(q)) · φ_j(x), on the fewer rows
                q, psi = self._apply_kernel(q.astype(np.float64)), np.asarray(phi, dtype=np.float32)
            else:
                psi = self._apply_kernel(np.asarray(phi, dtype=np.float64))
        else:
            psi = np.asarray(self.psi if sel is None else self.psi[sel], dtype=np.float32)
        out = np.empty((q.shape[0], n_rows, self.n_groups), dtype=np.float32)
        for j, (_, start, stop) in enumerate(self.group_slices):
            out[:, :, j] = q[:, start:stop] @ psi[:, start:stop].T
        return out

    def self_contributions(self, train_features: Any, *, chunk_rows: int = 8192, progress: bool = False) -> np.ndarray:
        """(N, M) float64 per-group self-influence c_j(x_n, x_n) = φ_j(x_n) · ψ_j(x_n), `train_features` being the
        Φ (N, k) this method was fitted on: row chunks of Φ and of Ψ (computed for the chunk in query-side mode),
        multiplied elementwise and summed within each group."""
        n, dim = self.n_train, self.dim
        if tuple(train_features.shape) != (n, dim):
            raise UserError(f"training features have shape {tuple(train_features.shape)}, the fitted method "
                            f"({n}, {dim})")
        out = np.empty((n, self.n_groups), dtype=np.float64)
        rows = effective_chunk_rows(int(chunk_rows), 16 * dim)
        for start, stop in row_chunks(n, rows, progress=progress, desc="self-influence"):
            phi = np.asarray(train_features[start:stop], dtype=np.float64)
            prod = phi * self.psi_rows(start, stop).astype(np.float64)
            for j, (_, lo, hi) in enumerate(self.group_slices):
                out[start:stop, j] = prod[:, lo:hi].sum(1)
        return out

    def topk_contributions(self, query_features: Any, idx: Any, *, group_slices: Any = None) -> np.ndarray:
        """Per-group contributions of each query's own rows: (Q, r, M) float32, out[q, i, j] = c_j(q, idx[q, i]) for
        `idx` (Q, r) (e.g. the top-k indices). In query-side mode K is applied to all queries at once."""
        q = np.asarray(self._check_queries(query_features, group_slices), dtype=np.float32)
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 2 or len(idx) != len(q):
            raise UserError(f"idx must be (Q, r) with Q = {len(q)} query rows, got shape {idx.shape}")
        check_rows(idx.reshape(-1), self.n_train)
        on_queries = self.query_side and self._kernel_within_groups()
        if on_queries:  # K block-diagonal within groups and symmetric: c_j = (K_j φ_j(q)) · φ_j(x)
            q = self._apply_kernel(q.astype(np.float64))
        starts = np.asarray([start for _, start, _ in self.group_slices])
        out = np.empty((len(q), idx.shape[1], self.n_groups), dtype=np.float32)
        for r in range(len(q)):
            if self.query_side and not on_queries:  # a kernel block spans groups: ψ rows = φ K
                rows = self._apply_kernel(np.asarray(self.psi[idx[r]], dtype=np.float64))
            else:
                rows = np.asarray(self.psi[idx[r]], dtype=np.float32)
            out[r] = np.add.reduceat(rows * q[r], starts, axis=1)
        return out

    def _kernel_within_groups(self) -> bool:
        """Whether every block of the query-side K lies inside one group (per-group kernel, or a single group): then
        c_j(q, n) = φ_j(q)ᵀ K_j φ_j(x_n) may be computed as (K_j φ_j(q)) · φ_j(x_n). A shared K spanning groups mixes
        them: c_j(q, n) = φ_j(q) · (K φ(x_n))_j differs from (K φ(q))_j · φ_j(x_n)."""
        return all(any(lo <= start and stop <= hi for _, lo, hi in self.group_slices)
                   for _, start, stop in self.query_kernel)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, extra: dict | None = None, chunk_rows: int = 65536) -> Path:
        """Write `psi.npy` (copied in row chunks unless Ψ already lives there) and `method.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / PSI_FILE
        source = None if self.query_side else getattr(self.psi, "filename", None)
        if source is None or Path(source).resolve() != target.resolve():
            with atomic_write(target, suffix=".tmp.npy") as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.psi.shape)
                rows = effective_chunk_rows(chunk_rows, 4 * self.dim)
                for start, stop in row_chunks(self.n_train, rows):
                    out[start:stop] = self.psi_rows(start, stop)
                out.flush()
                del out
        info = {k: v for k, v in self.info.items() if k != "query_side"}  # saved as Ψ
        manifest = {"format": FORMAT, "info": info,
                    "group_slices": [list(s) for s in self.group_slices],
                    "shape": [self.n_train, self.dim], "versions": versions()}
        if extra:
            manifest["extra"] = extra
        write_json_atomic(directory / INFO_FILE, manifest)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> "FittedMethod":
        """Load a saved fitted method; Ψ is memory-mapped read-only unless `mmap=False`."""
        directory = Path(directory)
        manifest = read_json(directory / INFO_FILE, "fitted method manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{directory / INFO_FILE} is not a gradtrace fitted method ({FORMAT}); "
                            f"point to a directory written by FittedMethod.save")
        psi_path = directory / PSI_FILE
        if not psi_path.exists():
            raise UserError(f"{psi_path} is missing; re-run the method fit")
        psi = np.load(psi_path, mmap_mode="r" if mmap else None)
        if list(psi.shape) != list(manifest.get("shape", [])):
            raise UserError(f"{psi_path} has shape {tuple(psi.shape)} but the manifest says "
                            f"{tuple(manifest.get('shape', []))}; re-run the method fit")
        fitted = cls(psi=psi, group_slices=manifest["group_slices"], info=manifest.get("info", {}))
        return fitted

    # ---- helpers -------------------------------------------------------------------------------
    def _check_queries(self, query_features: Any, group_slices: Any) -> np.ndarray:
        if group_slices is not None:
            check_same_layout(self.group_slices, group_slices)
        q = check_matrix(query_features, "query features", self.dim)
        raise_if_nonfinite(q, 0, "query features")
        return q
