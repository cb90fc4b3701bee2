"""Label-free choice of the TRAK λ scale c: the grid value whose kernel gives the best uniform-weight SNR.

For each c in the grid the kernel is refitted from one shared Gram pass (`TRAK.gram` + `fit(gram=)`),
and the objective mean_q L(uniform; q) is evaluated on the learning queries only (the signature has no
place for evaluation queries). The lowest loss wins; on equal losses, the smaller c.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gradtrace.errors import UserError
from gradtrace.methods.checks import check_group_slices, check_matrix, check_train_matrix, raise_if_nonfinite
from gradtrace.methods.registry import configure
from gradtrace.methods.trak import DEFAULT_KERNEL
from gradtrace.weights.defaults import DEFAULT_K
from gradtrace.weights.objective import check_k
from gradtrace.weights.row_source import RowSource, Shard


def choose_lambda_scale(train_features: Any, group_slices: Any, learning_query_features: Any, *,
                        method: str = "trak", kernel: str = DEFAULT_KERNEL, grid: Any = None, k: int = DEFAULT_K,
                        chunk_rows: int = 65536, progress: bool = False,
                        row_scale: Any = None, gram: Any = None,
                        psi_path: Any = None, shard: Shard | None = None) -> tuple[float, list[tuple[float, float]]]:
    """(best c, [(c, loss), ...] for every c in `grid`) with loss = mean_q L(uniform; q) on the learning queries.

    `method` is a kernel with a λ ("trak", "dtrak", "das"; "das" with the store's `row_scale`); `grid`
    defaults to the method's `lambda_grid()` (1e-4..1). `gram` (the kernel's Gram blocks of these features, e.g. kept
    beside the store) skips the Gram pass. `psi_path`: each c's Ψ is written to that `.npy` memmap in turn instead
    of memory (large stores). `shard` (a torchrun rank): `train_features` are the rank's rows, `gram` the job's
    blocks (required), and each c's objective is merged over the ranks (`gradtrace.weights.row_source`).
    """
    phi = check_train_matrix(train_features)
    slices = check_group_slices(group_slices, phi.shape[1])
    queries = check_matrix(learning_query_features, "learning query features", phi.shape[1])
    raise_if_nonfinite(queries, 0, "learning query features")
    queries = np.asarray(queries, dtype=np.float64)
    k = check_k(k, phi.shape[0] if shard is None else shard.n)
    method = method if isinstance(method, str) else method.name  # a configured method: its name (kernel as given)
    bare = configure(method, c=None)
    if not bare.uses_lambda or bare.needs_model:
        raise UserError(f"method '{method}' has no λ on features to choose; use 'trak', 'dtrak' or 'das'")
    values = _check_grid(bare.lambda_grid() if grid is None else grid)
    base = configure(method, kernel=kernel, c=values[0])
    # a kernel that shares one Gram pass over its values of c (TRAK's) is refitted from it; any other is refitted
    if base.shares_gram and gram is None:
        if shard is not None:
            raise UserError("a rank's λ search needs the job's Gram blocks (summed over ranks); pass gram")
        gram = base.gram(phi, slices, chunk_rows=chunk_rows, progress=progress)
    table: list[tuple[float, float]] = []
    for c in values:
        at = base.with_c(c)
        fitted = at.fit(phi, slices, chunk_rows=chunk_rows, gram=gram, row_scale=row_scale, psi_path=psi_path) \
            if base.shares_gram else at.fit(phi, slices, chunk_rows=chunk_rows, psi_path=psi_path)
        table.append((c, RowSource(fitted, shard).snr_at(queries, k, chunk_rows=chunk_rows)))
        del fitted  # its memmap of psi_path is released before the next c rewrites the file
    best = min(range(len(table)), key=lambda i: (table[i][1], table[i][0]))
    return table[best][0], table


def _check_grid(grid: Any) -> list[float]:
    try:
        values = [float(c) for c in np.asarray(grid, dtype=np.float64).ravel()]
    except (TypeError, ValueError):
        raise UserError("grid must be a list of positive numbers (λ scales c); pass e.g. lambda_grid()") from None
    if not values or not all(np.isfinite(c) and c > 0 for c in values):
        raise UserError(f"grid must be a non-empty list of finite positive numbers, got {grid!r}; "
                        f"pass e.g. lambda_grid()")
    return values
